"""LAA, Local Adaptive feature Aggregation (paper Sec. 3.2): a deformable downsampling layer.

The sampling points P_E = P_I + O_f (Eq. 1) are read bilinearly with one F.grid_sample call and
aggregated by the layer's weights with one matmul. That equals torchvision's deform_conv2d (the
tests compare them) and is faster on CPU, autocasts, and exports to ONNX (GridSample, opset 16).
With use_kernels("triton") the samples come from the Triton op hafa::laa_columns instead, written
straight into the matmul's rows (docs/kernels.md).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..ops.constants import shape_constant
from ..ops.kernels import laa_columns, use_triton

IntPair = int | tuple[int, int]


def _kernel_points(
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    out_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Where a conv reads without offsets, (y, x) in input pixels: K x 2 x Ho x Wo, K = kh * kw in raster order."""

    def build() -> Tensor:
        (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride), _pair(padding)
        Ho, Wo = out_size
        ky, kx = torch.meshgrid(torch.arange(kh, device=device), torch.arange(kw, device=device), indexing="ij")
        y = ky.reshape(-1, 1, 1) + (torch.arange(Ho, device=device) * sh - ph).view(1, Ho, 1)
        x = kx.reshape(-1, 1, 1) + (torch.arange(Wo, device=device) * sw - pw).view(1, 1, Wo)
        return torch.stack([y.expand(-1, Ho, Wo), x.expand(-1, Ho, Wo)], dim=1).to(dtype)

    key = ("kernel_points", _pair(kernel_size), _pair(stride), _pair(padding), tuple(out_size), dtype)
    return shape_constant(key, device, build)


def _position_dtype(offsets: Tensor) -> torch.dtype:
    """Positions in float32 at least: in bfloat16 one would be off by up to a quarter pixel."""
    return torch.promote_types(offsets.dtype, torch.float32)


def sampling_positions(offsets: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair) -> Tensor:
    """Absolute sampling positions (y, x) in input pixels: B x K x Ho x Wo x 2, K = kh * kw.

    offsets: B x 2K x Ho x Wo in deform_conv2d's layout, (dy, dx) for each kernel point in raster order.
    """
    B, _, Ho, Wo = offsets.shape
    points = _kernel_points(kernel_size, stride, padding, (Ho, Wo), offsets.device, _position_dtype(offsets))
    return (points + offsets.view(B, *points.shape)).permute(0, 1, 3, 4, 2)


def _normalised_kernel_points(
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The kernel points as grid_sample reads them, (x, y) normalised to [-1, 1] with align_corners=False
    ((2p + 1) / size - 1): K x 2 x Ho x Wo, and the scale of an offset in those units, 2 x 1 x 1."""
    H, W = in_size

    def build() -> tuple[Tensor, Tensor]:
        # Made by fills, not from a Python list: a list would be a host-to-device copy (a sync).
        scale = torch.cat(
            [
                torch.full((1, 1, 1), 2.0 / W, device=device, dtype=dtype),
                torch.full((1, 1, 1), 2.0 / H, device=device, dtype=dtype),
            ]
        )
        points = _kernel_points(kernel_size, stride, padding, out_size, device, dtype).flip(1)
        return points * scale + (scale / 2 - 1), scale

    key = ("normalised_kernel_points", _pair(kernel_size), _pair(stride), _pair(padding), in_size, out_size, dtype)
    return shape_constant(key, device, build)


def deformable_samples(x: Tensor, offsets: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair) -> Tensor:
    """Bilinear samples of x at the deformed kernel points, zero outside: B x C x K x Ho x Wo."""
    B, C, H, W = x.shape
    K, Ho, Wo = offsets.shape[1] // 2, offsets.shape[2], offsets.shape[3]
    points, scale = _normalised_kernel_points(
        kernel_size, stride, padding, (H, W), (Ho, Wo), x.device, _position_dtype(offsets)
    )
    grid = torch.addcmul(points, offsets.view(B, K, 2, Ho, Wo).flip(2), scale)  # B x K x (x, y) x Ho x Wo
    grid = grid.view(B, K, 2, Ho * Wo).transpose(2, 3)  # a K x Ho*Wo grid of (x, y), as grid_sample takes it
    samples = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return samples.view(B, C, K, Ho, Wo)


def check_map(x: Tensor, channels: int, layer: str) -> None:
    """A batch of feature maps a layer takes: B x channels x H x W with B, H, W >= 1 (shapes only)."""
    # each size on its own: min() over a symbolic batch and the static sizes would guard on the batch
    if x.dim() != 4 or x.shape[1] != channels or x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{layer} takes maps B x {channels} x H x W with B, H, W >= 1, got {tuple(x.shape)}")


def zero_offsets_(offset_predictor: nn.Conv2d) -> None:
    """Start an offset predictor at exactly zero offsets."""
    nn.init.zeros_(offset_predictor.weight)
    nn.init.zeros_(offset_predictor.bias)


# "batch": BatchNorm2d and GELU after the deformable conv, as in the authors' code (the paper's network).
# "baseline": the baseline downsampling's own norm, so that an LAA with zero offsets is that layer exactly.
LAA_NORMS = ("batch", "baseline")
# What LAA's BatchNorm2d can be, also after torch.nn.SyncBatchNorm.convert_sync_batchnorm.
BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def check_laa_norm(laa_norm: str) -> str:
    if laa_norm not in LAA_NORMS:
        raise ValueError(f"laa_norm must be one of {LAA_NORMS}, got {laa_norm!r}")
    return laa_norm


def batch_norm_act(x: Tensor, norm: nn.Module, act: nn.Module) -> Tensor:
    """A channels-first norm (BatchNorm2d, or SyncBatchNorm after conversion) and an activation on a
    channels-last map: B x H x W x C -> B x H x W x C."""
    return act(norm(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class ConvDownsample(nn.Module):
    """Fixed-grid downsampling of the baseline: conv, then a channel norm.

    B x Cin x H x W -> B x Ho x Wo x Cout (channels last, like timm's patch embeddings).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair = 0,
        norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm,
    ):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding)
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class LAA(nn.Module):
    """Deformable form of a downsampling conv (same kernel, stride, padding and width), then a norm.

    A conv of the same kernel and stride predicts a (dy, dx) offset for each kernel point of each
    output position; it starts at exactly zero, so an untrained LAA samples where the conv samples and
    a baseline checkpoint's `proj` loads unchanged. laa_norm="batch" (the paper's): BatchNorm2d and
    GELU; laa_norm="baseline": the baseline's norm_layer, so that it computes the baseline layer exactly.

    B x Cin x H x W -> B x Ho x Wo x Cout, and the offsets (B x 2K x Ho x Wo) with return_offsets.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair = 0,
        norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm,
        laa_norm: str = "batch",
    ):
        super().__init__()
        self.laa_norm = check_laa_norm(laa_norm)
        kh, kw = _pair(kernel_size)
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding)
        self.offset = nn.Conv2d(in_channels, 2 * kh * kw, kernel_size=kernel_size, stride=stride, padding=padding)
        if laa_norm == "batch":
            self.norm, self.act = nn.BatchNorm2d(out_channels), nn.GELU()
        else:
            self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()
            self.act = None
        self.reset_offsets()

    def reset_offsets(self) -> None:
        zero_offsets_(self.offset)

    def forward(self, x: Tensor, return_offsets: bool = False):
        proj = self.proj
        check_map(x, proj.in_channels, "LAA")
        offsets = self.offset(x)
        B, Ho, Wo = x.shape[0], offsets.shape[2], offsets.shape[3]
        if use_triton("laa", x, x.numel()):
            # The kernel writes the samples as B x Ho*Wo x K x Cin rows; the weight is read in that order.
            columns = laa_columns(x, offsets, proj.kernel_size, proj.stride, proj.padding)
            out = F.linear(columns.flatten(2), proj.weight.permute(0, 2, 3, 1).flatten(1), proj.bias)
        else:
            samples = deformable_samples(x, offsets, proj.kernel_size, proj.stride, proj.padding)
            # (B x Ho*Wo x Cin*K) @ (Cin*K x Cout): the output comes channels last and the bias is added
            # in the same call, with no transposed copy of the samples or of the output.
            columns = samples.view(B, -1, Ho * Wo).transpose(1, 2)
            weight = proj.weight.flatten(1).t().expand(B, -1, -1)
            out = torch.bmm(columns, weight) if proj.bias is None else torch.baddbmm(proj.bias, columns, weight)
        out = out.view(B, Ho, Wo, -1)
        out = self.norm(out) if self.act is None else batch_norm_act(out, self.norm, self.act)
        return (out, offsets) if return_offsets else out
