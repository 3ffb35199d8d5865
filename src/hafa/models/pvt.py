"""PVT v1 (Wang et al. 2021), baseline and with Hierarchy Aware Feature Aggregation.

Baselines `pvt_tiny` ... `pvt_large` (timm has no PVT v1) and HAFA forms `hafa_pvt_tiny` ...
`hafa_pvt_large`. Each stage: a patch embedding (4x4/s4 conv for the first, 2x2/s2 conv, LAA or SIA
for the transitions), an absolute position embedding (resized to the input), blocks; the class
token joins in the last stage and the final norm closes it. After SIA there is no explicit
position embedding (paper Sec. 3.1): SIA's keys/values carry position through their convs.
Official PVT v1 checkpoints (patch_embed1..4, pos_embed1..4, block1..4, norm, cls_token, head)
load with hafa.load_pretrained or timm's pretrained_cfg_overlay=dict(file=...).
"""

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..layers import LAA, Block, ConvDownsample
from ..ops import TokenLayout
from ..pretrained import checkpoint_filter_fn
from ._base import (
    BASELINE_AGGREGATION,
    HAFA_AGGREGATION,
    HafaBackbone,
    check_stage_aggregation,
    grid_downsample,
    hafa_cfg,
    run_blocks,
    run_downsample,
)

__all__ = ["HafaPvt"]

_BlockNorm = partial(nn.LayerNorm, eps=1e-6)


class PvtStage(nn.Module):
    """Patch embedding, position embedding (not after SIA), class token (last stage), blocks."""

    def __init__(
        self,
        dim,
        dim_out,
        depth,
        aggregation,
        grid_size,
        num_heads,
        sr_ratio,
        mlp_ratio,
        qkv_bias,
        proj_drop,
        attn_drop,
        drop_path,
        sia_args,
        class_token: bool,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if aggregation is None:
            self.patch_embed = ConvDownsample(dim, dim_out, 4, 4)
        else:
            self.patch_embed = grid_downsample(aggregation, dim, dim_out, 2, 2, 0, sia_args)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim_out)) if class_token else None
        if aggregation == "sia":
            self.pos_embed = None
        else:
            self.grid_size = grid_size
            self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1] + int(class_token), dim_out))
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim_out,
                    num_heads,
                    mlp_ratio,
                    sr_ratio,
                    False,
                    qkv_bias,
                    proj_drop,
                    attn_drop,
                    drop_path[i],
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

    The last stage's attention must not reduce keys/values (sr_ratios[-1] == 1, as in every PVT
    v1): its tokens include the class token, which has no place on a feature map.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
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
    ):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if sr_ratios[-1] != 1:
            raise ValueError(
                "PVT v1's last stage holds the class token and cannot reduce keys/values (sr_ratios[-1] must be 1)"
            )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.stage_aggregation = check_stage_aggregation(stage_aggregation)
        sia_args = dict(cluster_ratio=cluster_ratio, knn_k=knn_k, cluster_qkv=cluster_qkv)
        img_size = to_2tuple(img_size)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        aggregation = (None,) + self.stage_aggregation
        in_dims = (in_chans,) + tuple(embed_dims[:-1])
        self.stages = nn.ModuleList(
            [
                PvtStage(
                    in_dims[i],
                    embed_dims[i],
                    depths[i],
                    aggregation[i],
                    (img_size[0] // (4 * 2**i), img_size[1] // (4 * 2**i)),
                    num_heads[i],
                    sr_ratios[i],
                    mlp_ratios[i],
                    qkv_bias,
                    proj_drop_rate,
                    attn_drop_rate,
                    dpr[i],
                    sia_args,
                    class_token=i == 3,
                )
                for i in range(4)
            ]
        )
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)]
        self.norm = _BlockNorm(embed_dims[-1])
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        for stage in self.stages:
            if stage.pos_embed is not None:
                trunc_normal_(stage.pos_embed, std=0.02)
        trunc_normal_(self.stages[3].cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, LAA):
            m.reset_offsets()

    def stem(self, x: Tensor) -> tuple[Tensor, TokenLayout | None]:
        return x, None  # the first stage embeds the image itself

    def stage_output(self, index: int, x: Tensor, layout: TokenLayout, norm: bool) -> Tensor:
        if index == 3:
            x = (self.norm(x) if norm else x)[:, 1:]
        return layout.to_map(x)

    def pool(self, x: Tensor) -> Tensor:
        return x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(1)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith(("pos_embed", "cls_token"))}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\.0\.(patch_embed|pos_embed)", blocks=r"^stages\.(\d+)")


def _create(variant: str, pretrained: bool = False, **kwargs) -> HafaPvt:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        HafaPvt,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


_SIZES = {
    "tiny": (2, 2, 2, 2),
    "small": (3, 4, 6, 3),
    "medium": (3, 4, 18, 3),
    "large": (3, 8, 27, 3),
}

default_cfgs = generate_default_cfgs(
    {
        f"{prefix}pvt_{size}": hafa_cfg(first_conv="stages.0.patch_embed.proj", classifier="head")
        for prefix in ("", "hafa_")
        for size in _SIZES
    }
)


def _variant(size: str, hafa: bool, pretrained: bool, kwargs: dict) -> HafaPvt:
    args = dict(depths=_SIZES[size], stage_aggregation=HAFA_AGGREGATION if hafa else BASELINE_AGGREGATION)
    return _create(f"{'hafa_' if hafa else ''}pvt_{size}", pretrained, **dict(args, **kwargs))


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
