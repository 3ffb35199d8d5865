"""PVT v2 with Hierarchy Aware Feature Aggregation.

`hafa_pvt_v2_b0` ... `hafa_pvt_v2_b5`, `hafa_pvt_v2_b2_li`. The transitions 1->2, 2->3, 3->4 use
LAA, LAA, SIA by default (`stage_aggregation`); ("conv", "conv", "conv") is timm's `pvt_v2_*`
exactly, with the same parameter names, so timm and official PVT v2 checkpoints load directly.
After SIA the blocks' spatial-reduction attention and depthwise-conv MLP see a feature map through
the dictionary.
"""

import math
from collections.abc import Sequence

from timm.layers import LayerNorm, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..layers import LAA, Block, ConvDownsample
from ..ops import TokenLayout
from ..pretrained import checkpoint_filter_fn
from ._base import (
    HAFA_AGGREGATION,
    HafaBackbone,
    check_stage_aggregation,
    grid_downsample,
    hafa_cfg,
    run_blocks,
    run_downsample,
)

__all__ = ["HafaPvtV2"]


class PvtV2Stage(nn.Module):
    """Downsampling (none for the first stage), blocks, norm."""

    def __init__(
        self,
        dim,
        dim_out,
        depth,
        aggregation,
        num_heads,
        sr_ratio,
        linear,
        mlp_ratio,
        qkv_bias,
        proj_drop,
        attn_drop,
        drop_path,
        sia_args,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = None if aggregation is None else grid_downsample(aggregation, dim, dim_out, 3, 2, 1, sia_args)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim_out,
                    num_heads,
                    mlp_ratio,
                    sr_ratio,
                    linear,
                    qkv_bias,
                    proj_drop,
                    attn_drop,
                    drop_path[i],
                    dwconv_mlp=True,
                    norm_layer=LayerNorm,
                )
                for i in range(depth)
            ]
        )
        self.norm = LayerNorm(dim_out)

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
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.stage_aggregation = check_stage_aggregation(stage_aggregation)
        sia_args = dict(cluster_ratio=cluster_ratio, knn_k=knn_k, cluster_qkv=cluster_qkv)
        self.patch_embed = ConvDownsample(in_chans, embed_dims[0], 7, 4, 3)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        aggregation = (None,) + self.stage_aggregation
        self.stages = nn.ModuleList(
            [
                PvtV2Stage(
                    embed_dims[max(i - 1, 0)],
                    embed_dims[i],
                    depths[i],
                    aggregation[i],
                    num_heads[i],
                    sr_ratios[i],
                    linear,
                    mlp_ratios[i],
                    qkv_bias,
                    proj_drop_rate,
                    attn_drop_rate,
                    dpr[i],
                    sia_args,
                )
                for i in range(4)
            ]
        )
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)]
        self.norm = nn.Identity()  # every stage ends with its own norm
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, LAA):
            m.reset_offsets()

    def stem(self, x: Tensor) -> tuple[Tensor, TokenLayout]:
        x = self.patch_embed(x)
        return x.flatten(1, 2), TokenLayout(x.shape[1:3])

    @staticmethod
    def no_weight_decay() -> set:
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)")


def _create(variant: str, pretrained: bool = False, **kwargs) -> HafaPvtV2:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        HafaPvtV2,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return hafa_cfg(first_conv="patch_embed.proj", classifier="head", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        name: _cfg()
        for name in (
            "hafa_pvt_v2_b0",
            "hafa_pvt_v2_b1",
            "hafa_pvt_v2_b2",
            "hafa_pvt_v2_b3",
            "hafa_pvt_v2_b4",
            "hafa_pvt_v2_b5",
            "hafa_pvt_v2_b2_li",
        )
    }
)

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
