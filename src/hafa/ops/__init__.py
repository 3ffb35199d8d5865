"""HAFA's tensor operations: DPC-KNN clustering, token merging and the token <-> map dictionary."""

from .clustering import cluster_dpc_knn
from .merge import merge_tokens, merge_weights
from .token_map import TokenLayout, map2token, resize_map, token2map

__all__ = ["cluster_dpc_knn", "merge_tokens", "merge_weights", "token2map", "map2token", "resize_map", "TokenLayout"]
