"""Score-weighted token merging (paper Eq. 5)."""

import torch
from torch import Tensor


def merge_weights(cluster_ids: Tensor, num_clusters: int, scores: Tensor | None = None) -> Tensor:
    """Weight of each token inside its cluster, B x N (float32): softmax of the scores per cluster.

    exp(s_j - max of the cluster) / sum over the cluster, so that large scores cannot overflow in any
    dtype. Without scores every member weighs 1 / cluster size.
    """
    B, N = cluster_ids.shape
    if scores is None:
        e = torch.ones(B, N, device=cluster_ids.device)
    else:
        s = scores.reshape(B, N).float()
        cluster_max = s.new_full((B, num_clusters), -torch.inf).scatter_reduce(
            1, cluster_ids, s.detach(), reduce="amax", include_self=True
        )
        e = torch.exp(s - cluster_max.gather(1, cluster_ids))
    total = e.new_zeros(B, num_clusters).scatter_add(1, cluster_ids, e)
    return e / total.gather(1, cluster_ids)


def merge_tokens(x: Tensor, cluster_ids: Tensor, num_clusters: int, scores: Tensor | None = None) -> Tensor:
    """Merge the tokens of each cluster into one: y_c = sum_{j in c} w_j x_j.

    Args:
        x: tokens, B x N x C.
        cluster_ids: B x N long in [0, num_clusters). Only its shape and type are checked: checking its
            values would make the host wait for the device; a value outside the range gives an index
            error on the CPU and is undefined on a GPU.
        num_clusters: M.
        scores: optional importance scores, B x N or B x N x 1; w = softmax of the scores inside each
            cluster (plain average when None). Gradients flow to x and to scores.

    Returns:
        merged tokens, B x M x C (an empty cluster gives a zero token).
    """
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"merge_tokens: x must be floating-point tokens B x N x C, got {x.dtype} {tuple(x.shape)}")
    B, N, C = x.shape
    if cluster_ids.shape != (B, N) or cluster_ids.dtype != torch.long:
        raise ValueError(
            f"merge_tokens: cluster_ids must be long B x N = {B} x {N}, got {cluster_ids.dtype} "
            f"{tuple(cluster_ids.shape)}"
        )
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"merge_tokens: num_clusters must be a whole number >= 1, got {num_clusters!r}")
    if scores is not None and tuple(scores.shape) not in ((B, N), (B, N, 1)):
        raise ValueError(f"merge_tokens: scores must be B x N = {B} x {N} or B x N x 1, got {tuple(scores.shape)}")
    weights = merge_weights(cluster_ids, num_clusters, scores).to(x.dtype)
    return x.new_zeros(B, num_clusters, C).scatter_add(
        1, cluster_ids[:, :, None].expand(B, N, C), x * weights[:, :, None]
    )
