"""PVT v2 with Hierarchy Aware Feature Aggregation.

`hafa_pvt_v2_b0` ... `hafa_pvt_v2_b5`, `hafa_pvt_v2_b2_li`. The transitions 1->2, 2->3, 3->4 use
LAA, LAA, SIA by default (`stage_aggregation`); ("conv", "conv", "conv") is timm's `pvt_v2_*`
exactly, with the same parameter names, so timm and official PVT v2 checkpoints load directly.
After SIA the blocks' spatial-reduction attention and depthwise-conv MLP see a feature map through
the dictionary.
"""

import math
from collections.abc import Sequence

from timm.layers import LayerNorm, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ..layers import Block, ConvDownsample
from ..ops import TokenLayout
from ._base import HAFA_AGGREGATION, HafaBackbone, create_backbone, hafa_cfgs, run_blocks, run_downsample

__all__ = ["HafaPvtV2"]


class PvtV2Stage(nn.Module):
    """Downsampling (none for the first stage), blocks, norm."""

    def __init__(
        self,
        *,
        downsample: nn.Module | None,
        dim: int,
        depth: int,
        num_heads: int,
        sr_ratio: int,
        linear: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    sr_ratio=sr_ratio,
                    linear=linear,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                    dwconv_mlp=True,
                    norm_layer=LayerNorm,
                )
                for i in range(depth)
            ]
        )
        self.norm = LayerNorm(dim)

    def forward(self, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None = None) -> tuple[Tensor, TokenLayout]:
        kv = None
        if self.downsample is not None:
            x, layout, kv = run_downsample(self.downsample, x, layout, padding_mask)
        x = run_blocks(self.blocks, x, layout, kv, self.grad_checkpointing)
        return self.norm(x), layout


class HafaPvtV2(HafaBackbone):
    """PVT v2 (Wang et al. 2022) whose downsamplings are chosen per transition: 'conv', 'laa' or 'sia'."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (3, 4, 6, 3),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        qkv_bias: bool = True,
        linear: bool = False,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
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
        self.patch_embed = ConvDownsample(in_chans, embed_dims[0], kernel_size=7, stride=4, padding=3)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.stages = nn.ModuleList(
            [
                PvtV2Stage(
                    downsample=(
                        None
                        if i == 0
                        else self.transition(i, embed_dims[i - 1], embed_dims[i], kernel_size=3, stride=2, padding=1)
                    ),
                    dim=embed_dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    sr_ratio=sr_ratios[i],
                    linear=linear,
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                )
                for i in range(4)
            ]
        )
        self.norm = nn.Identity()  # every stage ends with its own norm
        self.init_head(embed_dims, drop_rate)
        self.apply(self._init_weights)

    @classmethod
    def _init_weights(cls, m: nn.Module) -> None:
        """timm pvt_v2's: convs normal with fan-out std (before LAA zeroes its offset predictor)."""
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:
            cls.init_linear_and_offsets(m)

    def stem(self, x: Tensor) -> tuple[Tensor, TokenLayout]:
        x = self.patch_embed(x)
        return x.flatten(1, 2), TokenLayout(x.shape[1:3])

    @staticmethod
    def no_weight_decay() -> set:
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)")


_CFG_ARGS = dict(first_conv="patch_embed.proj", classifier="head")
_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5", "b2_li")

default_cfgs = generate_default_cfgs(
    {
        name: cfg
        for variant in _VARIANTS
        for name, cfg in hafa_cfgs(
            f"hafa_pvt_v2_{variant}", dict(hf_hub_id=f"timm/pvt_v2_{variant}.in1k"), **_CFG_ARGS
        ).items()
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> HafaPvtV2:
    return create_backbone(HafaPvtV2, variant, pretrained, **kwargs)


_WIDE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))


@register_model
def hafa_pvt_v2_b0(pretrained=False, **kwargs) -> HafaPvtV2:
    args = dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8))
    return _create("hafa_pvt_v2_b0", pretrained, **dict(args, **kwargs))


@register_model
def hafa_pvt_v2_b1(pretrained=False, **kwargs) -> HafaPvtV2:
    return _create("hafa_pvt_v2_b1", pretrained, **dict(dict(depths=(2, 2, 2, 2), **_WIDE), **kwargs))


@register_model
def hafa_pvt_v2_b2(pretrained=False, **kwargs) -> HafaPvtV2:
    return _create("hafa_pvt_v2_b2", pretrained, **dict(dict(depths=(3, 4, 6, 3), **_WIDE), **kwargs))


@register_model
def hafa_pvt_v2_b3(pretrained=False, **kwargs) -> HafaPvtV2:
    return _create("hafa_pvt_v2_b3", pretrained, **dict(dict(depths=(3, 4, 18, 3), **_WIDE), **kwargs))


@register_model
def hafa_pvt_v2_b4(pretrained=False, **kwargs) -> HafaPvtV2:
    return _create("hafa_pvt_v2_b4", pretrained, **dict(dict(depths=(3, 8, 27, 3), **_WIDE), **kwargs))


@register_model
def hafa_pvt_v2_b5(pretrained=False, **kwargs) -> HafaPvtV2:
    args = dict(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4), **_WIDE)
    return _create("hafa_pvt_v2_b5", pretrained, **dict(args, **kwargs))


@register_model
def hafa_pvt_v2_b2_li(pretrained=False, **kwargs) -> HafaPvtV2:
    args = dict(depths=(3, 4, 6, 3), linear=True, **_WIDE)
    return _create("hafa_pvt_v2_b2_li", pretrained, **dict(args, **kwargs))
