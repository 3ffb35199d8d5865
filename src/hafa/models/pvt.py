"""PVT v1 (Wang et al. 2021), baseline and with Hierarchy Aware Feature Aggregation.

Baselines `pvt_tiny` ... `pvt_large` (timm has no PVT v1) and HAFA forms `hafa_pvt_tiny` ...
`hafa_pvt_large`. Each stage: a patch embedding (4x4/s4 conv for the first, 2x2/s2 conv, LAA or SIA
for the transitions), an absolute position embedding (resized to the input), blocks. The baselines
add a class token in the last stage and classify by it, as the PVT paper has it; a model with SIA
has none, as in the authors' HAFA code: its last stage attends among the merged tokens and the
classifier mean-pools them. After SIA there is no explicit position embedding (paper Sec. 3.1):
SIA's keys/values carry position through their convs. Official PVT v1 and HAFA checkpoints load
with hafa.load_pretrained (or timm's pretrained_cfg_overlay=dict(file=...)).
"""

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ..layers import Block, ConvDownsample
from ..ops import TokenLayout
from ._base import (
    BASELINE_AGGREGATION,
    HAFA_AGGREGATION,
    HAFA_OPTIONS,
    HafaBackbone,
    create_backbone,
    hafa_cfg,
    hafa_cfgs,
    run_blocks,
    run_downsample,
)

__all__ = ["HafaPvt"]

_BlockNorm = partial(nn.LayerNorm, eps=1e-6)


class PvtStage(nn.Module):
    """Patch embedding, position embedding (none after SIA), class token (optional), blocks."""

    def __init__(
        self,
        *,
        patch_embed: nn.Module,
        dim: int,
        depth: int,
        grid_size: tuple[int, int] | None,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        class_token: bool = False,
    ):
        """grid_size: the position embedding's grid at the nominal input size; None for no position embedding."""
        super().__init__()
        self.grad_checkpointing = False
        self.patch_embed = patch_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.grid_size = grid_size
        self.pos_embed = (
            None
            if grid_size is None
            else nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1] + int(class_token), dim))
        )
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    sr_ratio=sr_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                    dwconv_mlp=False,
                    norm_layer=_BlockNorm,
                )
                for i in range(depth)
            ]
        )

    def _position_embedding(self, size: tuple[int, int]) -> Tensor:
        prefix = self.pos_embed[:, : int(self.cls_token is not None)]
        grid = self.pos_embed[:, prefix.shape[1] :]
        if tuple(size) != tuple(self.grid_size):
            grid = grid.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        return torch.cat([prefix, grid], dim=1)

    def forward(
        self,
        x: Tensor,
        layout: TokenLayout | None,
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, TokenLayout]:
        """x: images (first stage) or the previous stage's tokens -> tokens (class token first, last stage)."""
        if layout is None:
            x = self.patch_embed(x)
            x, layout, kv = x.flatten(1, 2), TokenLayout(x.shape[1:3]), None
        else:
            x, layout, kv = run_downsample(self.patch_embed, x, layout, padding_mask)
        if self.cls_token is not None:
            cls_token = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([cls_token, x], dim=1)
            if kv is not None:
                kv = (torch.cat([cls_token, kv[0]], dim=1), kv[1])
        if self.pos_embed is not None:
            x = x + self._position_embedding(layout.map_size)
        x = run_blocks(self.blocks, self.pos_drop(x), layout, kv, self.grad_checkpointing)
        return x, layout


class HafaPvt(HafaBackbone):
    """PVT v1 whose transitions are chosen per stage: 'conv' (the baseline), 'laa' or 'sia'.

    class_token (default: when no transition is SIA) adds PVT's class token to the last stage, whose
    attention then must not reduce keys/values (sr_ratios[-1] == 1, as in every PVT v1).
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str | None = None,
        depths: Sequence[int] = (2, 2, 2, 2),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        stage_aggregation: Sequence[str] = HAFA_AGGREGATION,
        cluster_qkv: bool = False,
        cluster_ratio: float = 0.25,
        knn_k: int = 5,
        laa_norm: str = "batch",
        class_token: bool | None = None,
    ):
        """global_pool: 'token' (the class token; default with one), 'avg' (mean of the other tokens) or ''."""
        stage_aggregation = HAFA_OPTIONS["stage_aggregation"].check(stage_aggregation, "stage_aggregation")
        if class_token is None:
            class_token = "sia" not in stage_aggregation
        super().__init__(
            num_classes=num_classes,
            global_pool=global_pool if global_pool is not None else ("token" if class_token else "avg"),
            stage_aggregation=stage_aggregation,
            cluster_qkv=cluster_qkv,
            cluster_ratio=cluster_ratio,
            knn_k=knn_k,
            laa_norm=laa_norm,
            class_token=class_token,
            in_chans=in_chans,
            drop_rate=drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        if class_token and sr_ratios[-1] != 1:
            raise ValueError("PVT v1's class token has no place on a map: with it, sr_ratios[-1] must be 1")
        img_size = to_2tuple(img_size)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        for i in range(4):
            if i == 0:
                patch_embed = ConvDownsample(in_chans, embed_dims[0], kernel_size=4, stride=4)
            else:
                patch_embed = self.transition(i, embed_dims[i - 1], embed_dims[i], kernel_size=2, stride=2, padding=0)
            after_sia = i > 0 and self.stage_aggregation[i - 1] == "sia"
            stages.append(
                PvtStage(
                    patch_embed=patch_embed,
                    dim=embed_dims[i],
                    depth=depths[i],
                    grid_size=None if after_sia else (img_size[0] // (4 * 2**i), img_size[1] // (4 * 2**i)),
                    num_heads=num_heads[i],
                    sr_ratio=sr_ratios[i],
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    class_token=class_token and i == 3,
                )
            )
        self.stages = nn.ModuleList(stages)
        self.norm = _BlockNorm(embed_dims[-1])
        self.init_head(embed_dims, drop_rate)
        for stage in self.stages:
            if stage.pos_embed is not None:
                trunc_normal_(stage.pos_embed, std=0.02)
        if class_token:
            trunc_normal_(self.stages[3].cls_token, std=0.02)
        self.apply(self.init_linear_and_offsets)

    def stem(self, x: Tensor) -> tuple[Tensor, TokenLayout | None]:
        return x, None  # the first stage embeds the image itself

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith(("pos_embed", "cls_token"))}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\.0\.(patch_embed|pos_embed)", blocks=r"^stages\.(\d+)")


_CFG_ARGS = dict(first_conv="stages.0.patch_embed.proj", classifier="head")


def _cfg(**kwargs) -> dict:
    return hafa_cfg(**_CFG_ARGS, **kwargs)


_SIZES = {
    "tiny": (2, 2, 2, 2),
    "small": (3, 4, 6, 3),
    "medium": (3, 4, 18, 3),
    "large": (3, 8, 27, 3),
}

# The official PVT v1 ImageNet weights (github.com/whai362/PVT, classification branch).
_OFFICIAL_URL = "https://github.com/whai362/PVT/releases/download/v2/pvt_{size}.pth"

default_cfgs = generate_default_cfgs(
    {
        **{f"pvt_{size}": _cfg() for size in _SIZES},
        **{
            name: cfg
            for size in _SIZES
            for name, cfg in hafa_cfgs(
                f"hafa_pvt_{size}", dict(url=_OFFICIAL_URL.format(size=size)), **_CFG_ARGS
            ).items()
        },
    }
)


def _variant(size: str, hafa: bool, pretrained: bool, kwargs: dict) -> HafaPvt:
    args = dict(depths=_SIZES[size], stage_aggregation=HAFA_AGGREGATION if hafa else BASELINE_AGGREGATION)
    return create_backbone(HafaPvt, f"{'hafa_' if hafa else ''}pvt_{size}", pretrained, **dict(args, **kwargs))


@register_model
def pvt_tiny(pretrained=False, **kwargs) -> HafaPvt:
    return _variant("tiny", False, pretrained, kwargs)


@register_model
def pvt_small(pretrained=False, **kwargs) -> HafaPvt:
    return _variant("small", False, pretrained, kwargs)


@register_model
def pvt_medium(pretrained=False, **kwargs) -> HafaPvt:
    return _variant("medium", False, pretrained, kwargs)


@register_model
def pvt_large(pretrained=False, **kwargs) -> HafaPvt:
    return _variant("large", False, pretrained, kwargs)


@register_model
def hafa_pvt_tiny(pretrained=False, **kwargs) -> HafaPvt:
    return _variant("tiny", True, pretrained, kwargs)


@register_model
def hafa_pvt_small(pretrained=False, **kwargs) -> HafaPvt:
    return _variant("small", True, pretrained, kwargs)


@register_model
def hafa_pvt_medium(pretrained=False, **kwargs) -> HafaPvt:
    return _variant("medium", True, pretrained, kwargs)


@register_model
def hafa_pvt_large(pretrained=False, **kwargs) -> HafaPvt:
    return _variant("large", True, pretrained, kwargs)
