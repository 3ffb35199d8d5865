"""LAA, Local Adaptive feature Aggregation (paper Sec. 3.2): a deformable downsampling layer.

The sampling points P_E = P_I + O_f (Eq. 1) are read bilinearly and aggregated by the layer's weights
with one matmul. The samples are written straight into the matmul's rows (B x Ho*Wo x K x C): each is a
bag of the four pixels around its point with their bilinear weights, one F.embedding_bag over the map's
pixel rows (`sample_columns`); a compiler keeps that call whole, where it would unroll a grid_sample into
slow gathers. While exporting, one F.grid_sample call (ONNX GridSample, opset 16) reads them instead.
Both equal torchvision's deform_conv2d (the tests compare them). With use_kernels("triton") the rows come
from the Triton op hafa::laa_columns (docs/kernels.md).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..ops.constants import batch_offsets, shape_constant
from ..ops.kernels import laa_columns, use_triton
from .options import HafaOptions

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


def _corners(device: torch.device) -> tuple[Tensor, Tensor]:
    """The four pixels around a point, as (dy, dx) from its top-left one: 2 x 4 long, and which of them
    take the fraction (1) or its complement (0) along each axis, 2 x 4 bool."""

    def build() -> tuple[Tensor, Tensor]:
        steps = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]], device=device)
        return steps, steps.bool()

    return shape_constant(("bilinear_corners",), device, build)


def _bilinear_taps(positions: Tensor, size: tuple[int, int], batch_rows: Tensor) -> tuple[Tensor, Tensor]:
    """The four pixels around each (y, x) position (... x 2, input pixels) as rows of the B*H*W pixel
    table, and their bilinear weights (zero outside the map, where the row is a clamped neighbour):
    ... x 4 each. batch_rows: where each image's pixels start, broadcastable to positions[..., 0]."""
    H, W = size
    steps, takes_fraction = _corners(positions.device)
    top_left = positions.floor()
    fraction = (positions - top_left)[..., None]  # ... x 2 x 1
    pixel = top_left.long()[..., None] + steps  # ... x 2 x 4: (y, x) of each corner
    weight = torch.where(takes_fraction, fraction, 1 - fraction).prod(-2)
    y, x = pixel.unbind(-2)
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    rows = batch_rows[..., None] + y.clamp(0, H - 1) * W + x.clamp(0, W - 1)
    return rows, torch.where(inside, weight, 0)


def _bags_rows(x: Tensor) -> bool:
    """Whether the samples are bagged into rows (CPU), or read by grid_sample (GPU: fewer launches; exports:
    ONNX has GridSample)."""
    return x.device.type == "cpu" and not torch.compiler.is_exporting()


def sample_columns(
    x: Tensor, offsets: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, kx_major: bool = False
) -> Tensor:
    """Bilinear samples of x (B x C x H x W, any strides) at the deformed kernel points, zero outside, as
    the rows of the aggregation matmul: B x Ho*Wo x K x C, K = kh * kw in raster order (kx outer with
    kx_major, timm's patch-merging order). The PyTorch form of hafa::laa_columns."""
    B, C, H, W = x.shape
    (kh, kw), K, Ho, Wo = _pair(kernel_size), offsets.shape[1] // 2, offsets.shape[2], offsets.shape[3]
    if not _bags_rows(x):
        samples = deformable_samples(x, offsets, kernel_size, stride, padding).view(B, C, kh, kw, Ho * Wo)
        samples = samples.permute(0, 4, 3, 2, 1) if kx_major else samples.permute(0, 4, 2, 3, 1)
        return samples.reshape(B, Ho * Wo, K, C)
    positions = sampling_positions(offsets, kernel_size, stride, padding).permute(0, 2, 3, 1, 4)  # B Ho Wo K 2
    if kx_major:
        positions = positions.reshape(B, Ho, Wo, kh, kw, 2).transpose(3, 4)
    batch_rows = batch_offsets(B, H * W, x.device).view(B, 1, 1, 1)
    rows, weights = _bilinear_taps(positions.reshape(B, Ho, Wo, K, 2), (H, W), batch_rows)
    table = x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view when x is channels last in memory
    columns = F.embedding_bag(
        rows.reshape(-1, 4), table, mode="sum", per_sample_weights=weights.reshape(-1, 4).to(x.dtype)
    )
    return columns.view(B, Ho * Wo, K, C)


def check_map(x: Tensor, channels: int, layer: str) -> None:
    """A batch of feature maps a layer takes: B x channels x H x W with B, H, W >= 1 (shapes only)."""
    # each size on its own: min() over a symbolic batch and the static sizes would guard on the batch
    if x.dim() != 4 or x.shape[1] != channels or x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{layer} takes maps B x {channels} x H x W with B, H, W >= 1, got {tuple(x.shape)}")


def _whole_pair(value, low: int) -> bool:
    """Whether value is a whole number >= low or a pair of them (a conv's kernel, stride or padding)."""
    values = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value,)
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)


def check_geometry(layer: str, in_channels, out_channels, kernel_size, stride, padding) -> None:
    """A downsampling conv's constructor arguments: widths >= 1, kernel and stride >= 1, padding >= 0
    (each a whole number or a pair); a ValueError naming the argument otherwise."""
    for name, value, low in (
        ("in_channels", in_channels, 1),
        ("out_channels", out_channels, 1),
        ("kernel_size", kernel_size, 1),
        ("stride", stride, 1),
        ("padding", padding, 0),
    ):
        if name.endswith("channels"):
            allowed = isinstance(value, int) and not isinstance(value, bool) and value >= low
            what = f"a whole number >= {low}"
        else:
            allowed, what = _whole_pair(value, low), f"a whole number >= {low} or a pair of them"
        if not allowed:
            raise ValueError(f"{layer}: {name} must be {what}, got {value!r}")


def zero_offsets_(offset_predictor: nn.Conv2d) -> None:
    """Start an offset predictor at exactly zero offsets."""
    nn.init.zeros_(offset_predictor.weight)
    nn.init.zeros_(offset_predictor.bias)


# What LAA's BatchNorm2d can be, also after torch.nn.SyncBatchNorm.convert_sync_batchnorm.
BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def check_laa_norm(laa_norm: str) -> str:
    """laa_norm, one of LAA_NORMS (see HafaOptions), or a ValueError naming it."""
    return HafaOptions.SETTINGS["laa_norm"].check(laa_norm, "laa_norm")


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


def deformable_columns(
    x: Tensor, offsets: Tensor, kernel_size: IntPair, stride: IntPair, padding: IntPair, kx_major: bool = False
) -> Tensor:
    """The matmul's rows of samples, B x Ho*Wo x K x C: hafa::laa_columns with use_kernels("triton")
    (where chosen), else sample_columns."""
    if use_triton("laa", x, x.numel()):
        return laa_columns(x, offsets, _pair(kernel_size), _pair(stride), _pair(padding), kx_major)
    return sample_columns(x, offsets, kernel_size, stride, padding, kx_major)


def deformable_conv(x: Tensor, offsets: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv's weights applied to bilinear samples of x at its kernel points moved by offsets:
    x B x Cin x H x W, offsets B x 2K x Ho x Wo -> B x Ho x Wo x Cout (channels last)."""
    B, Ho, Wo = x.shape[0], offsets.shape[2], offsets.shape[3]
    if conv.groups > 1:  # depthwise (check_deformable): each channel's K samples weighted by its own kernel
        columns = deformable_columns(x, offsets, conv.kernel_size, conv.stride, conv.padding)
        out = (columns * conv.weight.flatten(1).t()).sum(2)
        out = out if conv.bias is None else out + conv.bias
    elif use_triton("laa", x, x.numel()) or _bags_rows(x):
        columns = deformable_columns(x, offsets, conv.kernel_size, conv.stride, conv.padding)
        # the rows hold K x Cin samples: the weight read in that order; the output comes channels last
        out = F.linear(columns.flatten(2), conv.weight.permute(0, 2, 3, 1).flatten(1), conv.bias)
    else:
        samples = deformable_samples(x, offsets, conv.kernel_size, conv.stride, conv.padding)
        # (B x Ho*Wo x Cin*K) @ (Cin*K x Cout) on the transposed samples: no copy of them or of the output
        columns = samples.view(B, -1, Ho * Wo).transpose(1, 2)
        weight = conv.weight.flatten(1).t().expand(B, -1, -1)
        out = torch.bmm(columns, weight) if conv.bias is None else torch.baddbmm(conv.bias, columns, weight)
    return out.view(B, Ho, Wo, -1)


def offset_predictor(conv: nn.Conv2d) -> nn.Conv2d:
    """A conv of conv's kernel, stride and padding predicting (dy, dx) for each kernel point, at zero."""
    kh, kw = conv.kernel_size
    predictor = nn.Conv2d(conv.in_channels, 2 * kh * kw, conv.kernel_size, stride=conv.stride, padding=conv.padding)
    zero_offsets_(predictor)
    return predictor.to(device=conv.weight.device, dtype=conv.weight.dtype)


def check_deformable(conv: nn.Conv2d) -> None:
    """LAA samples for plain or depthwise strided convs: no other groups, dilation or padding other than zeros."""
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    problems = [
        f"groups={conv.groups}" if conv.groups != 1 and not depthwise else "",
        f"dilation={conv.dilation}" if conv.dilation != (1, 1) else "",
        f"padding_mode='{conv.padding_mode}'" if conv.padding_mode != "zeros" else "",
        f"padding='{conv.padding}'" if isinstance(conv.padding, str) else "",
    ]
    if any(problems):
        raise ValueError(
            f"LAA takes a plain or depthwise strided conv (groups 1 or one per channel, no dilation, zero padding "
            f"given as numbers), not {conv} "
            f"({', '.join(p for p in problems if p)}); keep this transition 'conv'"
        )


class LAA(nn.Module):
    """Deformable form of a downsampling conv (same kernel, stride, padding and width), then a norm.

    A conv of the same kernel and stride predicts a (dy, dx) offset for each kernel point of each
    output position; it starts at exactly zero, so an untrained LAA samples where the conv samples and
    a baseline checkpoint's `proj` loads unchanged. laa_norm="batch" (the paper's): BatchNorm2d and
    GELU; laa_norm="baseline": the baseline's norm_layer, so that it computes the baseline layer exactly.
    `from_downsample` makes the LAA form of a conv + norm downsampling, keeping its layers.

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
        check_geometry("LAA", in_channels, out_channels, kernel_size, stride, padding)
        self.laa_norm = check_laa_norm(laa_norm)
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding)
        self.offset = offset_predictor(self.proj)
        if laa_norm == "batch":
            self.norm, self.act = nn.BatchNorm2d(out_channels), nn.GELU()
        else:
            self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()
            self.act = None

    @classmethod
    def from_downsample(cls, proj: nn.Conv2d, norm: nn.Module, laa_norm: str) -> "LAA":
        """The LAA form of a downsampling that is proj (a strided conv) then norm (channels last): proj's
        weights become LAA's, and norm stays with laa_norm="baseline" (BatchNorm and GELU with "batch")."""
        check_deformable(proj)
        kernel = dict(kernel_size=proj.kernel_size, stride=proj.stride, padding=proj.padding)
        with torch.device("meta"):
            laa = cls(
                in_channels=proj.in_channels,
                out_channels=proj.out_channels,
                **kernel,
                norm_layer=None,
                laa_norm=laa_norm,
            )
        laa.proj = proj
        laa.offset = offset_predictor(proj)
        if laa_norm == "batch":
            laa.norm = nn.BatchNorm2d(proj.out_channels).to(device=proj.weight.device)
        else:
            laa.norm = norm
        return laa

    def reset_offsets(self) -> None:
        zero_offsets_(self.offset)

    def sampling_geometry(self) -> tuple[tuple, tuple, tuple]:
        """(kernel, stride, padding) of the points the offsets move."""
        return self.proj.kernel_size, self.proj.stride, self.proj.padding

    def forward(self, x: Tensor, return_offsets: bool = False):
        check_map(x, self.proj.in_channels, "LAA")
        offsets = self.offset(x)
        out = deformable_conv(x, offsets, self.proj)
        out = self.norm(out) if self.act is None else batch_norm_act(out, self.norm, self.act)
        return (out, offsets) if return_offsets else out


class DeformableConv2d(nn.Conv2d):
    """A strided conv (plain or depthwise) read at learned offsets (zero at start): the LAA form of a
    transition whose norm comes before its conv (ConvNeXt, MetaFormer), which stays where it is, or of
    MViTv2's query pooling. Its weight and bias keep the
    conv's names; laa_norm="batch" adds BatchNorm and GELU after it. B x Cin x H x W -> B x Cout x Ho x Wo."""

    def __init__(self, *args, laa_norm: str = "baseline", **kwargs):
        super().__init__(*args, **kwargs)
        check_deformable(self)
        geometry = (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding)
        check_geometry("DeformableConv2d", *geometry)
        self.laa_norm = check_laa_norm(laa_norm)
        self.offset = offset_predictor(self)
        if laa_norm == "batch":
            self.out_norm, self.act = nn.BatchNorm2d(self.out_channels), nn.GELU()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, laa_norm: str) -> "DeformableConv2d":
        """conv's deformable form, holding conv's own weight and bias tensors."""
        check_deformable(conv)
        geometry = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, groups=conv.groups)
        with torch.device("meta"):
            deformable = cls(
                conv.in_channels, conv.out_channels, bias=conv.bias is not None, **geometry, laa_norm=laa_norm
            )
        deformable.weight, deformable.bias = conv.weight, conv.bias
        deformable.offset = offset_predictor(conv)
        if laa_norm == "batch":
            deformable.out_norm = nn.BatchNorm2d(conv.out_channels).to(device=conv.weight.device)
            deformable.act = nn.GELU()
        return deformable

    def reset_offsets(self) -> None:
        zero_offsets_(self.offset)

    def sampling_geometry(self) -> tuple[tuple, tuple, tuple]:
        return self.kernel_size, self.stride, self.padding

    def forward(self, x: Tensor, return_offsets: bool = False):
        check_map(x, self.in_channels, "DeformableConv2d")
        offsets = self.offset(x)
        out = deformable_conv(x, offsets, self).permute(0, 3, 1, 2)
        if self.laa_norm == "batch":
            out = self.act(self.out_norm(out))
        return (out, offsets) if return_offsets else out


class LAAPatchMerging(nn.Module):
    """Swin's patch merging (each 2x2 block concatenated, then a linear) whose four points move by learned
    offsets (zero at start). norm_first (Swin v1): LayerNorm over the 4C concatenation before the linear,
    which stays in both LAA modes; else (Swin v2) LayerNorm after the linear, the transition's own norm,
    replaced by BatchNorm with laa_norm="batch". laa_norm="batch" adds BatchNorm and GELU after it.

    B x H x W x C -> B x ceil(H/2) x ceil(W/2) x out_dim (NHWC, as timm's patch merging). Parameters:
    offset (new), norm and reduction (timm's), and with laa_norm="batch" out_norm (new).
    """

    def __init__(
        self, dim: int, out_dim: int, norm_layer=nn.LayerNorm, laa_norm: str = "batch", norm_first: bool = True
    ):
        super().__init__()
        check_geometry("LAAPatchMerging", dim, out_dim, 2, 2, 0)
        self.laa_norm = check_laa_norm(laa_norm)
        self.norm_first = norm_first
        self.offset = nn.Conv2d(dim, 8, kernel_size=2, stride=2)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        if norm_first:
            self.norm = norm_layer(4 * dim)
        elif laa_norm == "baseline":
            self.norm = norm_layer(out_dim)
        if laa_norm == "batch":
            self.out_norm, self.act = nn.BatchNorm2d(out_dim), nn.GELU()
        self.reset_offsets()

    @classmethod
    def from_patch_merging(cls, merging: nn.Module, laa_norm: str, norm_first: bool = True) -> "LAAPatchMerging":
        """The LAA form of timm's patch merging (its norm and reduction kept)."""
        reduction = merging.reduction
        dim = reduction.in_features // 4
        with torch.device("meta"):
            laa = cls(dim=dim, out_dim=reduction.out_features, laa_norm=laa_norm, norm_first=norm_first)
        laa.reduction = reduction
        device = reduction.weight.device
        laa.offset = nn.Conv2d(dim, 8, kernel_size=2, stride=2).to(device)
        laa.reset_offsets()
        if norm_first or laa_norm == "baseline":
            laa.norm = merging.norm
        if laa_norm == "batch":
            laa.out_norm, laa.act = nn.BatchNorm2d(reduction.out_features).to(device), nn.GELU()
        return laa

    def reset_offsets(self) -> None:
        zero_offsets_(self.offset)

    def sampling_geometry(self) -> tuple[tuple, tuple, tuple]:
        return (2, 2), (2, 2), (0, 0)

    def forward(self, x: Tensor, return_offsets: bool = False):
        x = x.permute(0, 3, 1, 2)  # a view: the offsets' conv and the sampling read NCHW
        check_map(x, self.offset.in_channels, "LAAPatchMerging")
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        offsets = self.offset(x)
        B, C, Ho, Wo = x.shape[0], x.shape[1], offsets.shape[2], offsets.shape[3]
        # timm concatenates the 2x2 block as (kx, ky, C)
        merged = deformable_columns(x, offsets, 2, 2, 0, kx_major=True).reshape(B, Ho, Wo, 4 * C)
        if self.norm_first:
            out = self.reduction(self.norm(merged))
        else:
            out = self.reduction(merged)
            if self.laa_norm == "baseline":
                out = self.norm(out)
        if self.laa_norm == "batch":
            out = batch_norm_act(out, self.out_norm, self.act)
        return (out, offsets) if return_offsets else out


# Every LAA layer (each has its `laa_norm` and zero-initialised offsets).
LAA_LAYERS = (LAA, DeformableConv2d, LAAPatchMerging)
