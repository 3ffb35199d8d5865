"""Triton kernels of hafa::laa_columns: bilinear samples written as matmul rows, and their backward.

Output pixel p (flat over B x Ho x Wo) and column slot `slot` (a kernel point) sample x at
y = oy*sh - ph + ky + dy, x = ox*sw - pw + kx + dx from the four integer pixels around it, zero outside
the map, as F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) does. Arithmetic
is float32 whatever the dtype of x and the offsets.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import on_device


def laa_tiles(channels: int, backward: bool) -> tuple[int, int]:
    """(output pixels, channels) in one program's tile, with 4 warps: sizes at which ptxas keeps a tile in
    registers on sm_90 (the backward holds four corners, the gradient and eight addresses per element)."""
    pixels, most_channels = (16, 16) if backward else (32, 32)
    return pixels, min(most_channels, triton.next_power_of_2(channels))


@triton.jit
def _sampling_point(
    off_ptr, p, p_ok, slot, Ho, Wo, s_ob, s_oc, s_oh, s_ow, SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, KX_MAJOR: tl.constexpr,
):  # fmt: skip
    """For pixels p and column slot `slot`: batch index (int64), output row and column, the kernel point's
    raster index, and the sampling position (y, x) in input pixels (float32)."""
    b = (p // (Ho * Wo)).to(tl.int64)
    oy = (p // Wo) % Ho
    ox = p % Wo
    if KX_MAJOR:
        ky = slot % KH
        kx = slot // KH
    else:
        ky = slot // KW
        kx = slot % KW
    point = ky * KW + kx
    dy_at = b * s_ob + (2 * point) * s_oc + oy * s_oh + ox * s_ow
    dy = tl.load(off_ptr + dy_at, mask=p_ok, other=0.0).to(tl.float32)
    dx = tl.load(off_ptr + dy_at + s_oc, mask=p_ok, other=0.0).to(tl.float32)
    y = (oy * SH - PH + ky).to(tl.float32) + dy
    x = (ox * SW - PW + kx).to(tl.float32) + dx
    return b, oy, ox, point, y, x


@triton.jit
def _pixel(yf, xf, H, W, s_h, s_w):
    """Whether the integer pixels (yf, xf) (float32) lie in the H x W map, and their element offsets."""
    inside = (yf >= 0) & (yf < H) & (xf >= 0) & (xf < W)
    y = tl.where(inside, yf, 0.0).to(tl.int64)
    x = tl.where(inside, xf, 0.0).to(tl.int64)
    return inside, y * s_h + x * s_w


@triton.jit
def _corners(y0, x0, H, W, s_h, s_w):
    """The four pixels around sampling points whose top-left pixel is (y0, x0): (inside, offset) for the
    top left, top right, bottom left and bottom right."""
    in00, at00 = _pixel(y0, x0, H, W, s_h, s_w)
    in01, at01 = _pixel(y0, x0 + 1, H, W, s_h, s_w)
    in10, at10 = _pixel(y0 + 1, x0, H, W, s_h, s_w)
    in11, at11 = _pixel(y0 + 1, x0 + 1, H, W, s_h, s_w)
    return in00, at00, in01, at01, in10, at10, in11, at11


@triton.jit
def _corner_values(x_ptr, channel_at, tile_ok, in00, at00, in01, at01, in10, at10, in11, at11):
    """x at the four corners (zero outside the map) for a pixels x channels tile, float32."""
    v00 = tl.load(x_ptr + channel_at + at00[:, None], mask=tile_ok & in00[:, None], other=0.0).to(tl.float32)
    v01 = tl.load(x_ptr + channel_at + at01[:, None], mask=tile_ok & in01[:, None], other=0.0).to(tl.float32)
    v10 = tl.load(x_ptr + channel_at + at10[:, None], mask=tile_ok & in10[:, None], other=0.0).to(tl.float32)
    v11 = tl.load(x_ptr + channel_at + at11[:, None], mask=tile_ok & in11[:, None], other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def _columns_kernel(
    x_ptr, off_ptr, col_ptr, num_pixels, C, H, W, Ho, Wo,
    s_xb, s_xc, s_xh, s_xw, s_ob, s_oc, s_oh, s_ow, SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, KX_MAJOR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """columns[p, slot, c] for BLOCK_P pixels, one slot and BLOCK_C channels; columns is B*Ho*Wo x K x C."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    slot = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < num_pixels
    tile_ok = p_ok[:, None] & (c < C)[None, :]
    b, _, _, _, y, x = _sampling_point(
        off_ptr, p, p_ok, slot, Ho, Wo, s_ob, s_oc, s_oh, s_ow, SH, SW, PH, PW, KH, KW, KX_MAJOR
    )
    y0 = tl.floor(y)
    x0 = tl.floor(x)
    ly = (y - y0)[:, None]
    lx = (x - x0)[:, None]
    corners = _corners(y0, x0, H, W, s_xh, s_xw)
    v00, v01, v10, v11 = _corner_values(x_ptr, b[:, None] * s_xb + c[None, :] * s_xc, tile_ok, *corners)
    sample = (v00 * (1 - lx) + v01 * lx) * (1 - ly) + (v10 * (1 - lx) + v11 * lx) * ly
    K: tl.constexpr = KH * KW
    out_at = (p.to(tl.int64) * K + slot)[:, None] * C + c[None, :]
    tl.store(col_ptr + out_at, sample.to(col_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _columns_backward_kernel(
    grad_ptr, x_ptr, off_ptr, grad_x_ptr, grad_off_ptr, num_pixels, C, H, W, Ho, Wo,
    s_gb, s_gl, s_gk, s_gc, s_xb, s_xc, s_xh, s_xw, s_ob, s_oc, s_oh, s_ow,
    s_dxb, s_dxc, s_dxh, s_dxw, s_dob, s_doc, s_doh, s_dow, SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, KX_MAJOR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """For BLOCK_P pixels and one slot, over all channels: the offsets' gradient (stored) and x's gradient
    (added atomically into the float32 grad_x, several samples may read one pixel)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    slot = tl.program_id(1)
    p_ok = p < num_pixels
    b, oy, ox, point, y, x = _sampling_point(
        off_ptr, p, p_ok, slot, Ho, Wo, s_ob, s_oc, s_oh, s_ow, SH, SW, PH, PW, KH, KW, KX_MAJOR
    )
    y0 = tl.floor(y)
    x0 = tl.floor(x)
    ly = (y - y0)[:, None]
    lx = (x - x0)[:, None]
    corners = _corners(y0, x0, H, W, s_xh, s_xw)
    in00, dat00, in01, dat01, in10, dat10, in11, dat11 = _corners(y0, x0, H, W, s_dxh, s_dxw)
    grad_row_at = b * s_gb + (oy * Wo + ox) * s_gl + slot * s_gk
    grad_dy = tl.zeros([BLOCK_P], dtype=tl.float32)
    grad_dx = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tile_ok = p_ok[:, None] & (c < C)[None, :]
        g = tl.load(grad_ptr + grad_row_at[:, None] + c[None, :] * s_gc, mask=tile_ok, other=0.0).to(tl.float32)
        v00, v01, v10, v11 = _corner_values(x_ptr, b[:, None] * s_xb + c[None, :] * s_xc, tile_ok, *corners)
        grad_dy += tl.sum(g * ((v10 - v00) * (1 - lx) + (v11 - v01) * lx), axis=1)
        grad_dx += tl.sum(g * ((v01 - v00) * (1 - ly) + (v11 - v10) * ly), axis=1)
        grad_at = grad_x_ptr + b[:, None] * s_dxb + c[None, :] * s_dxc
        tl.atomic_add(grad_at + dat00[:, None], g * (1 - ly) * (1 - lx), mask=tile_ok & in00[:, None], sem="relaxed")
        tl.atomic_add(grad_at + dat01[:, None], g * (1 - ly) * lx, mask=tile_ok & in01[:, None], sem="relaxed")
        tl.atomic_add(grad_at + dat10[:, None], g * ly * (1 - lx), mask=tile_ok & in10[:, None], sem="relaxed")
        tl.atomic_add(grad_at + dat11[:, None], g * ly * lx, mask=tile_ok & in11[:, None], sem="relaxed")
    dy_at = b * s_dob + (2 * point) * s_doc + oy * s_doh + ox * s_dow
    tl.store(grad_off_ptr + dy_at, grad_dy.to(grad_off_ptr.dtype.element_ty), mask=p_ok)
    tl.store(grad_off_ptr + dy_at + s_doc, grad_dx.to(grad_off_ptr.dtype.element_ty), mask=p_ok)


def _geometry(kernel_size, stride, padding) -> dict:
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return dict(SH=sh, SW=sw, PH=ph, PW=pw, KH=kh, KW=kw)


def sample_columns(x: Tensor, offsets: Tensor, kernel_size, stride, padding, kx_major: bool) -> Tensor:
    """hafa::laa_columns: B x Ho*Wo x K x C in x's dtype."""
    B, C, H, W = x.shape
    Ho, Wo = offsets.shape[2:]
    K = kernel_size[0] * kernel_size[1]
    columns = x.new_empty(B, Ho * Wo, K, C)
    if columns.numel() == 0:
        return columns
    block_pixels, block_channels = laa_tiles(C, backward=False)
    grid = (triton.cdiv(B * Ho * Wo, block_pixels), K, triton.cdiv(C, block_channels))
    with on_device(x):
        _columns_kernel[grid](
            x, offsets, columns, B * Ho * Wo, C, H, W, Ho, Wo, *x.stride(), *offsets.stride(),
            **_geometry(kernel_size, stride, padding), KX_MAJOR=kx_major, BLOCK_P=block_pixels, BLOCK_C=block_channels,
        )  # fmt: skip
    return columns


def sample_columns_backward(
    grad_columns: Tensor, x: Tensor, offsets: Tensor, kernel_size, stride, padding, kx_major: bool
) -> tuple[Tensor, Tensor]:
    """hafa::laa_columns_backward: (grad_x like x, grad_offsets like offsets)."""
    B, C, H, W = x.shape
    Ho, Wo = offsets.shape[2:]
    K = kernel_size[0] * kernel_size[1]
    grad_x = torch.zeros_like(x, dtype=torch.float32)  # atomics add in float32; x's strides where x is dense
    grad_offsets = torch.empty_like(offsets)
    if grad_offsets.numel() == 0 or C == 0:
        return grad_x.to(x.dtype), grad_offsets.zero_()
    block_pixels, block_channels = laa_tiles(C, backward=True)
    grid = (triton.cdiv(B * Ho * Wo, block_pixels), K)
    with on_device(x):
        _columns_backward_kernel[grid](
            grad_columns, x, offsets, grad_x, grad_offsets, B * Ho * Wo, C, H, W, Ho, Wo,
            *grad_columns.stride(), *x.stride(), *offsets.stride(), *grad_x.stride(), *grad_offsets.stride(),
            **_geometry(kernel_size, stride, padding), KX_MAJOR=kx_major, BLOCK_P=block_pixels, BLOCK_C=block_channels,
        )  # fmt: skip
    return grad_x.to(x.dtype), grad_offsets
