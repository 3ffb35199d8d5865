"""LAA's sampling as a torch.library custom op: `hafa::laa_columns` and its backward `hafa::laa_columns_backward`.

The Triton kernels live in `_laa_triton` and are imported on the first call, so that registering the ops
neither needs nor imports triton.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from .selection import require_triton_device


def _check_geometry(x: Tensor, offsets: Tensor, kernel_size: Sequence[int]) -> None:
    if x.dim() != 4 or offsets.dim() != 4 or offsets.shape[0] != x.shape[0]:
        raise ValueError(f"laa_columns: x B x C x H x W and offsets B x 2K x Ho x Wo, got {x.shape}, {offsets.shape}")
    if offsets.shape[1] != 2 * kernel_size[0] * kernel_size[1]:
        raise ValueError(f"laa_columns: {offsets.shape[1]} offset channels for a {tuple(kernel_size)} kernel")


@torch.library.custom_op("hafa::laa_columns", mutates_args=())
def laa_columns(
    x: Tensor,
    offsets: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    kx_major: bool = False,
) -> Tensor:
    """Bilinear samples of x (B x C x H x W, any strides) at the deformed kernel points, zero outside,
    as the rows of the aggregation matmul: B x Ho*Wo x K x C in x's dtype, K = kh * kw.

    Point k of output pixel (oy, ox) is read at (oy*sh - ph + ky + dy, ox*sw - pw + kx + dx) input pixels,
    (dy, dx) = offsets[:, 2k : 2k + 2] (B x 2K x Ho x Wo, deform_conv2d's layout, raster order). The K
    columns come in raster order (ky outer), or kx outer with kx_major (timm's patch-merging order).
    """
    _check_geometry(x, offsets, kernel_size)
    require_triton_device("hafa::laa_columns", x)
    from ._laa_triton import sample_columns

    return sample_columns(x, offsets, kernel_size, stride, padding, kx_major)


@laa_columns.register_fake
def _(x, offsets, kernel_size, stride, padding, kx_major=False):
    _check_geometry(x, offsets, kernel_size)
    B, C = x.shape[:2]
    return x.new_empty(B, offsets.shape[2] * offsets.shape[3], kernel_size[0] * kernel_size[1], C)


@torch.library.custom_op("hafa::laa_columns_backward", mutates_args=())
def laa_columns_backward(
    grad_columns: Tensor,
    x: Tensor,
    offsets: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    kx_major: bool,
) -> tuple[Tensor, Tensor]:
    """The gradients of laa_columns' inputs from the gradient of its columns (B x Ho*Wo x K x C):
    (grad_x like x, grad_offsets like offsets)."""
    require_triton_device("hafa::laa_columns_backward", x)
    from ._laa_triton import sample_columns_backward

    return sample_columns_backward(grad_columns, x, offsets, kernel_size, stride, padding, kx_major)


@laa_columns_backward.register_fake
def _(grad_columns, x, offsets, kernel_size, stride, padding, kx_major):
    return torch.empty_like(x), torch.empty_like(offsets)


def _setup_context(ctx, inputs, output) -> None:
    x, offsets, kernel_size, stride, padding, kx_major = inputs
    ctx.save_for_backward(x, offsets)
    ctx.geometry = (kernel_size, stride, padding, kx_major)


def _backward(ctx, grad_columns: Tensor):
    x, offsets = ctx.saved_tensors
    grad_x, grad_offsets = laa_columns_backward(grad_columns, x, offsets, *ctx.geometry)
    return grad_x, grad_offsets, None, None, None, None


torch.library.register_autograd("hafa::laa_columns", _backward, setup_context=_setup_context)
