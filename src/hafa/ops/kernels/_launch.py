"""What both Triton modules need to launch a kernel."""

import contextlib

import torch
from torch import Tensor


def on_device(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device), or in the interpreter for CPU tensors."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
