"""Fused Triton kernels for LAA's sampling and for DPC-KNN, as torch.library custom ops (docs/kernels.md).

`use_kernels("torch" | "triton" | "auto")` picks the implementation; the PyTorch path stays the reference
and the CPU path. Importing this package registers the ops (hafa::laa_columns, hafa::laa_columns_backward,
hafa::dpc_knn) without importing triton: the kernels are compiled on their first call.
"""

from .dpc_knn_ops import dpc_knn
from .laa_ops import laa_columns, laa_columns_backward
from .selection import FASTER_WITH_TRITON, KERNEL_MODES, MeasuredFaster, kernel_mode, use_kernels, use_triton

__all__ = [
    "use_kernels",
    "kernel_mode",
    "use_triton",
    "KERNEL_MODES",
    "FASTER_WITH_TRITON",
    "MeasuredFaster",
    "laa_columns",
    "laa_columns_backward",
    "dpc_knn",
]
