"""HAFA's tensor operations: DPC-KNN clustering, token merging, the token <-> map dictionary, and the
choice between the PyTorch path and the Triton kernels (use_kernels)."""

from .clustering import cluster_dpc_knn
from .kernels import kernel_mode, use_kernels
from .merge import merge_tokens, merge_weights
from .token_map import TokenLayout, map2token, resize_map, token2map

__all__ = [
    "cluster_dpc_knn",
    "merge_tokens",
    "merge_weights",
    "token2map",
    "map2token",
    "resize_map",
    "TokenLayout",
    "use_kernels",
    "kernel_mode",
]
