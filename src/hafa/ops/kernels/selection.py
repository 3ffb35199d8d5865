"""Which implementation HAFA's two fused operations take: the PyTorch path or the Triton kernels.

Modes: "torch" (the PyTorch path everywhere, the reference), "triton" (the kernels on CUDA tensors,
and on CPU tensors under TRITON_INTERPRET=1, Triton's interpreter; anything else is an error) and
"auto", the default: the kernels only where `FASTER_WITH_TRITON` records a GPU measurement in which
they beat the PyTorch path, the PyTorch path everywhere else. float64 inputs always take the PyTorch
path. The choice reads only Python state and a tensor's device and dtype, so torch.compile and
torch.export trace through it without a graph break (the mode is a guarded global).
"""

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import Tensor

KERNEL_MODES = ("torch", "triton", "auto")
_TRITON_DTYPES = {
    "laa": (torch.float32, torch.bfloat16, torch.float16),
    "dpc_knn": (torch.float32,),  # cluster_dpc_knn casts to float32 first
}


@dataclass(frozen=True)
class MeasuredFaster:
    """One GPU measurement in which a Triton kernel beat the PyTorch path, forward and backward: GPUs of
    compute capability `capability`, inputs of `dtype`, and a size in [min_size, max_size] (LAA: elements
    of the input map B*C*H*W; DPC-KNN: tokens per image N). `source` names the measurement (a file)."""

    capability: tuple[int, int]
    dtype: torch.dtype
    min_size: int
    max_size: int
    source: str


# Where "auto" takes the kernels. No GPU has measured them yet (benchmarks/bench_kernels.py does), so
# both lists are empty and "auto" is the PyTorch path everywhere.
FASTER_WITH_TRITON: dict[str, tuple[MeasuredFaster, ...]] = {"laa": (), "dpc_knn": ()}

_mode = "auto"


class PreviousMode(str):
    """What use_kernels() returns: the mode in force before the call ("torch" | "triton" | "auto"), which
    is also a context manager that restores that mode on exit."""

    def __enter__(self) -> "PreviousMode":
        return self

    def __exit__(self, *exc_info) -> None:
        global _mode
        _mode = str(self)


def use_kernels(mode: str) -> PreviousMode:
    """Set the process-wide kernel mode ("torch" | "triton" | "auto") and return the previous one.

    As a context manager, `with use_kernels("triton"): ...` restores the previous mode on exit.
    """
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"use_kernels: mode must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "triton" and importlib.util.find_spec("triton") is None:
        raise RuntimeError("use_kernels('triton') needs the triton package (pip install triton)")
    previous = PreviousMode(_mode)
    _mode = str(mode)  # a plain str (not a PreviousMode passed back in): dynamo guards on it
    return previous


def kernel_mode() -> str:
    """The process-wide kernel mode: "torch", "triton" or "auto"."""
    return _mode


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set: Triton then defines its kernels for its CPU interpreter. (Triton
    reads it once, when the kernels are first imported; set it before that.)"""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_runs_on(x: Tensor) -> bool:
    return x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())


def require_triton_device(op: str, x: Tensor) -> None:
    """Raise unless Triton can run on x's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if not _triton_runs_on(x):
        raise ValueError(f"{op} runs a Triton kernel: it needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def _measured_faster(kernel: str, x: Tensor, size: int) -> bool:
    entries = FASTER_WITH_TRITON[kernel]
    if not entries:
        return False
    capability = torch.cuda.get_device_capability(x.device)
    return any(e.capability == capability and e.dtype == x.dtype and e.min_size <= size <= e.max_size for e in entries)


def use_triton(kernel: str, x: Tensor, size: int) -> bool:
    """Whether `kernel` ("laa" | "dpc_knn") runs as its Triton kernel for input x in the current mode.

    size: what FASTER_WITH_TRITON's entries bound for this kernel (see MeasuredFaster).
    """
    if _mode == "torch" or x.dtype not in _TRITON_DTYPES[kernel]:
        return False
    if _mode == "auto":
        return x.device.type == "cuda" and _measured_faster(kernel, x, size)
    if _triton_runs_on(x):
        return True
    raise ValueError(
        f"use_kernels('triton'): the {kernel} kernel needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; "
        f"got a {x.device.type} tensor"
    )
