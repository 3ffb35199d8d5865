"""Tensors that depend only on shapes: sampling grids, pooling taps, attention masks.

In eager mode each is built once per key and kept, so that a forward does not launch the same
small arange / index kernels again in every layer and every call (on a GPU at small batches the
launches, not the arithmetic, set the time). While compiling, exporting, tracing, capturing a CUDA
graph or running on fake tensors nothing is kept: the graph computes them itself (a kept tensor
would be frozen into it as a constant, or left unfilled by a capture). On a GPU each stream keeps
its own, so that no stream reads a tensor another stream is still writing. At most 64 MB are kept
in all; `clear()` frees them.
"""

from collections.abc import Callable, Hashable

import torch
from torch import Tensor
from torch._guards import detect_fake_mode

# Enough for every size a few models meet in one run; cleared when full (a detector trained at many
# sizes would otherwise keep a Swin attention mask of several MB for each).
_MAX_ENTRIES = 256
_MAX_BYTES = 64 * 2**20
_kept: dict[Hashable, Tensor | tuple[Tensor, ...]] = {}
_kept_bytes = 0


def _nbytes(value: Tensor | tuple[Tensor, ...]) -> int:
    tensors = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors)


def graph_capture() -> bool:
    """Whether torch.compile, torch.export or the TorchScript tracer is recording this code."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def _keeps_nothing() -> bool:
    """A graph is being recorded, a CUDA graph captured, or tensors are fake (memory estimators)."""
    if graph_capture() or detect_fake_mode() is not None:
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def clear() -> None:
    """Drop every kept tensor (they are rebuilt when next needed)."""
    global _kept_bytes
    _kept.clear()
    _kept_bytes = 0


def shape_constant(key: Hashable, device: torch.device, build: Callable[[], Tensor | tuple[Tensor, ...]]):
    """build() once per key and device (the key must name every shape and dtype that build depends on).

    The result is made outside inference mode and without gradient, so that it can be kept and used
    by any later forward, training included. Callers must not modify it in place.
    """
    global _kept_bytes
    if _keeps_nothing():
        return build()
    device = torch.device(device)
    if device.type == "cuda":
        key = (key, device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (key, device)
    kept = _kept.get(key)
    if kept is None:
        with torch.inference_mode(False), torch.no_grad():
            kept = build()
        size = _nbytes(kept)
        if size <= _MAX_BYTES:  # a larger one is handed out without being kept or emptying the store
            if len(_kept) >= _MAX_ENTRIES or _kept_bytes + size > _MAX_BYTES:
                clear()
            _kept[key] = kept
            _kept_bytes += size
    return kept


def token_indices(n: int, device: torch.device) -> Tensor:
    """0 .. n-1 (long)."""
    return shape_constant(("token_indices", n), device, lambda: torch.arange(n, device=device))


def batch_offsets(batch: int, rows_per_image: int, device: torch.device) -> Tensor:
    """B x 1: where each image's rows start when the rows of the batch are stacked."""
    return shape_constant(
        ("batch_offsets", batch, rows_per_image),
        device,
        lambda: torch.arange(batch, device=device)[:, None] * rows_per_image,
    )
