"""DPC-KNN as a torch.library custom op, `hafa::dpc_knn`: the clusters of ops.clustering's PyTorch path
from four Triton launches (kernels in `_dpc_knn_triton`, imported on the first call)."""

import torch
from torch import Tensor

from ..bounded import bounded_tokens
from .selection import require_triton_device


@torch.library.custom_op("hafa::dpc_knn", mutates_args=())
def dpc_knn(x: Tensor, num_clusters: int, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Density peak clustering of tokens x (B x N x C, float32), as cluster_dpc_knn: (cluster_ids B x N
    long, centres B x M long ascending). num_clusters (M) and k must already be capped at N; mask is
    None or B x N bool (True for padding). The kernels cluster bounded_tokens(x, k), as the PyTorch path
    does: NaN, infinite and huge tokens give its partition, every index in range."""
    require_triton_device("hafa::dpc_knn", x)
    if x.dtype != torch.float32 or not 1 <= num_clusters <= x.shape[1] or not 1 <= k <= x.shape[1]:
        raise ValueError(f"hafa::dpc_knn: float32 B x N x C tokens, 1 <= num_clusters, k <= N; got {x.dtype} {x.shape}")
    from ._dpc_knn_triton import cluster

    return cluster(bounded_tokens(x, k), num_clusters, k, mask)


@dpc_knn.register_fake
def _(x, num_clusters, k, mask):
    B, N, _ = x.shape
    return x.new_empty(B, N, dtype=torch.long), x.new_empty(B, num_clusters, dtype=torch.long)
