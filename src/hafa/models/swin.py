"""Swin Transformer with Hierarchy Aware Feature Aggregation.

`hafa_swin_tiny_patch4_window7_224`, `_small_`, `_base_`. Patch merging (concatenate each 2x2
block, LayerNorm, linear) reads a fixed 2x2 grid: a 2x2/s2 kernel. Its LAA form samples those four
points at learned offsets before the same norm and linear (then, by default, BatchNorm and GELU, as
LAA has in the authors' code); with laa_norm="baseline" and zero offsets it is the baseline's patch
merging exactly. SIA projects with Swin's own patch merging, so a Swin checkpoint's last
downsampling fills it. Stages on a grid are timm's own Swin blocks.

After SIA, the stage's blocks attend globally over the merged tokens: windows are squares of a
grid, and merged tokens have no grid order to cut into windows (the dictionary can paint them onto
a map, but a token spread over several windows would then be updated several times and averaged).
At 224 x 224 the last stage is a single 7 x 7 window, so global attention is what Swin computes
there anyway; the merged stage holds a quarter of the tokens, which keeps global attention cheap at
detection sizes. Those blocks have separate q and kv projections (for SIA's keys/values); a
checkpoint's fused qkv is split into them on loading.
"""

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, calculate_drop_path_rates, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import SIA, Block, batch_norm_act, check_laa_norm, deformable_samples
from ..layers.laa import check_map, zero_offsets_
from ..ops import TokenLayout
from ..ops.constants import shape_constant
from ..ops.kernels import laa_columns, use_triton
from ._base import HAFA_AGGREGATION, HafaBackbone, create_backbone, hafa_cfgs, run_blocks, run_downsample

__all__ = ["HafaSwin"]


class GridPatchMerging(PatchMerging):
    """timm's patch merging on a B x C x H x W map -> B x ceil(H/2) x ceil(W/2) x out_dim (the baseline)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1))


class PatchMergingMap(PatchMerging):
    """timm's patch merging from map to map, B x C x H x W -> B x out_dim x ceil(H/2) x ceil(W/2): SIA's projection."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CachedMaskSwinBlock(SwinTransformerBlock):
    """timm's Swin block for any input size (dynamic_mask) whose shifted-window mask is kept per size,
    as timm's fixed-size block keeps its one mask, instead of being rebuilt in every forward."""

    def get_attn_mask(self, x: Tensor | None = None, *args, **kwargs) -> Tensor | None:
        if x is None or not any(self.shift_size):
            return super().get_attn_mask(x, *args, **kwargs)
        key = ("swin_attn_mask", self.window_size, self.shift_size, tuple(x.shape[1:3]), x.dtype)
        return shape_constant(key, x.device, partial(SwinTransformerBlock.get_attn_mask, self, x))


class LAAPatchMerging(nn.Module):
    """Patch merging whose four 2x2 points move by learned offsets (zero at start); laa_norm="batch"
    adds BatchNorm and GELU after it.

    B x C x H x W -> B x ceil(H/2) x ceil(W/2) x out_dim. Parameters: offset (new), norm and reduction
    (timm's), and with laa_norm="batch" out_norm (new).
    """

    def __init__(self, dim: int, out_dim: int, norm_layer=nn.LayerNorm, laa_norm: str = "batch"):
        super().__init__()
        self.laa_norm = check_laa_norm(laa_norm)
        self.offset = nn.Conv2d(dim, 8, kernel_size=2, stride=2)
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        if laa_norm == "batch":
            self.out_norm, self.act = nn.BatchNorm2d(out_dim), nn.GELU()
        self.reset_offsets()

    def reset_offsets(self) -> None:
        zero_offsets_(self.offset)

    def forward(self, x: Tensor, return_offsets: bool = False):
        check_map(x, self.offset.in_channels, "LAAPatchMerging")
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        offsets = self.offset(x)
        B, C, Ho, Wo = x.shape[0], x.shape[1], offsets.shape[2], offsets.shape[3]
        # timm concatenates the 2x2 block as (kx, ky, C)
        if use_triton("laa", x, x.numel()):
            merged = laa_columns(x, offsets, (2, 2), (2, 2), (0, 0), kx_major=True).view(B, Ho, Wo, 4 * C)
        else:
            samples = deformable_samples(x, offsets, kernel_size=2, stride=2, padding=0)  # B, C, (ky, kx), Ho, Wo
            merged = samples.view(B, C, 2, 2, Ho, Wo).permute(0, 4, 5, 3, 2, 1).reshape(B, Ho, Wo, 4 * C)
        out = self.reduction(self.norm(merged))
        if self.laa_norm == "batch":
            out = batch_norm_act(out, self.out_norm, self.act)
        return (out, offsets) if return_offsets else out


class SwinStage(nn.Module):
    """Downsampling (none for the first stage), then timm's windowed Swin blocks on a grid, or
    global-attention blocks over merged tokens after SIA."""

    def __init__(
        self,
        *,
        downsample: nn.Module | None,
        dim: int,
        depth: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample
        self.windowed = not isinstance(downsample, SIA)
        if self.windowed:
            window_size = to_2tuple(window_size)
            self.blocks = nn.ModuleList(
                [
                    CachedMaskSwinBlock(
                        dim,
                        input_resolution=input_resolution,
                        num_heads=num_heads,
                        window_size=window_size,
                        shift_size=0 if i % 2 == 0 else tuple(w // 2 for w in window_size),
                        dynamic_mask=True,
                        mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias,
                        proj_drop=proj_drop,
                        attn_drop=attn_drop,
                        drop_path=drop_path[i],
                    )
                    for i in range(depth)
                ]
            )
        else:
            self.blocks = nn.ModuleList(
                [
                    Block(
                        dim,
                        num_heads=num_heads,
                        mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias,
                        proj_drop=proj_drop,
                        attn_drop=attn_drop,
                        drop_path=drop_path[i],
                        dwconv_mlp=False,
                    )
                    for i in range(depth)
                ]
            )

    def forward(self, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None = None) -> tuple[Tensor, TokenLayout]:
        kv = None
        if self.downsample is not None:
            x, layout, kv = run_downsample(self.downsample, x, layout, padding_mask)
        if not self.windowed:
            return run_blocks(self.blocks, x, layout, kv, self.grad_checkpointing), layout
        x = x.view(x.shape[0], *layout.map_size, x.shape[-1])
        for block in self.blocks:
            x = (
                checkpoint(block, x, use_reentrant=False)
                if self.grad_checkpointing and torch.is_grad_enabled()
                else block(x)
            )
        return x.flatten(1, 2), layout


class _Head(nn.Module):
    """Linear classifier named like timm Swin's head (head.fc)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class HafaSwin(HafaBackbone):
    """Swin Transformer whose patch mergings are chosen per transition: 'conv' (timm's patch merging), 'laa' or 'sia'.

    Any input size: windows are padded (timm) and odd sizes padded before merging.
    """

    stages_name = "layers"  # timm Swin's name, so that its checkpoints load as they are

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        stage_aggregation: Sequence[str] = HAFA_AGGREGATION,
        cluster_qkv: bool = False,
        cluster_ratio: float = 0.25,
        knn_k: int = 5,
        laa_norm: str = "batch",
    ):
        super().__init__(
            num_classes=num_classes,
            global_pool=global_pool,
            stage_aggregation=stage_aggregation,
            cluster_qkv=cluster_qkv,
            cluster_ratio=cluster_ratio,
            knn_k=knn_k,
            laa_norm=laa_norm,
            in_chans=in_chans,
            drop_rate=drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        dims = [embed_dim * 2**i for i in range(4)]
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=dims[0],
            norm_layer=nn.LayerNorm,
            strict_img_size=False,
            dynamic_img_pad=True,
            output_fmt="NHWC",
        )
        grid = self.patch_embed.grid_size
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.layers = nn.ModuleList(
            [
                SwinStage(
                    downsample=None if i == 0 else self._patch_merging(i, dims[i - 1], dims[i]),
                    dim=dims[i],
                    depth=depths[i],
                    input_resolution=(-(-grid[0] // 2**i), -(-grid[1] // 2**i)),
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                )
                for i in range(4)
            ]
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.init_head(dims, drop_rate, stem_stride=patch_size)
        self.apply(self.init_linear_and_offsets)

    def _patch_merging(self, index: int, dim: int, out_dim: int) -> nn.Module:
        """Swin's transitions: patch merging, its LAA form, or SIA projecting by patch merging."""
        kind = self.stage_aggregation[index - 1]
        if kind == "sia":
            return SIA(dim, out_dim, proj=PatchMergingMap(dim, out_dim=out_dim), **self.sia_args)
        if kind == "laa":
            return LAAPatchMerging(dim, out_dim=out_dim, laa_norm=self.laa_norm)
        return GridPatchMerging(dim, out_dim=out_dim)

    def _new_head(self, num_classes: int) -> nn.Module:
        return _Head(self.num_features, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def stem(self, x: Tensor) -> tuple[Tensor, TokenLayout]:
        x = self.patch_embed(x)
        return x.flatten(1, 2), TokenLayout(x.shape[1:3])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)")


# timm's ImageNet-1k weights of each Swin baseline.
_SWIN_IN1K = {"tiny": "ms_in1k", "small": "ms_in1k", "base": "ms_in1k"}

default_cfgs = generate_default_cfgs(
    {
        name: cfg
        for size, tag in _SWIN_IN1K.items()
        for name, cfg in hafa_cfgs(
            f"hafa_swin_{size}_patch4_window7_224",
            dict(hf_hub_id=f"timm/swin_{size}_patch4_window7_224.{tag}"),
            first_conv="patch_embed.proj",
            classifier="head.fc",
        ).items()
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> HafaSwin:
    return create_backbone(HafaSwin, variant, pretrained, **kwargs)


@register_model
def hafa_swin_tiny_patch4_window7_224(pretrained=False, **kwargs) -> HafaSwin:
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create("hafa_swin_tiny_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def hafa_swin_small_patch4_window7_224(pretrained=False, **kwargs) -> HafaSwin:
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create("hafa_swin_small_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def hafa_swin_base_patch4_window7_224(pretrained=False, **kwargs) -> HafaSwin:
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create("hafa_swin_base_patch4_window7_224", pretrained, **dict(args, **kwargs))
