"""PVT v1 (Wang et al. 2021), which timm does not have: `pvt_tiny` ... `pvt_large`, in timm's style.

Each stage: a patch embedding (a 4x4/s4 conv for the first, a 2x2/s2 conv for the transitions, then
a LayerNorm), an absolute position embedding (resized to the input), blocks; the last stage adds a
class token, by which the model classifies, as the PVT paper has it. The HAFA forms `hafa_pvt_*`
are their conversions (hafa.models.families.pvt). Official PVT v1 checkpoints load with
hafa.load_pretrained (or timm's pretrained_cfg_overlay=dict(file=...)).
"""

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import ConvDownsample, pvt_block
from ..ops import TokenLayout
from .common import MODEL_ARGUMENTS, check_images, hafa_cfg

__all__ = ["PyramidVisionTransformer"]

_BlockNorm = partial(nn.LayerNorm, eps=1e-6)


class PvtStage(nn.Module):
    """Patch embedding, position embedding, class token (optional), blocks: a map (or the images, for
    the first stage) B x C x H x W -> tokens B x (1 + N) x C with their layout (the class token first)."""

    def __init__(
        self,
        *,
        patch_embed: nn.Module,
        dim: int,
        depth: int,
        grid_size: tuple[int, int],
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        class_token: bool = False,
    ):
        """grid_size: the position embedding's grid at the nominal input size."""
        super().__init__()
        self.grad_checkpointing = False
        self.patch_embed = patch_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1] + int(class_token), dim))
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList(
            [
                pvt_block(
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

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token is not None)

    def position_embedding(self, size: tuple[int, int]) -> Tensor:
        """The position embedding for a size x grid (resized bilinearly from the nominal grid)."""
        prefix = self.pos_embed[:, : self.num_prefix_tokens]
        grid = self.pos_embed[:, prefix.shape[1] :]
        if tuple(size) != tuple(self.grid_size):
            grid = grid.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        return torch.cat([prefix, grid], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, TokenLayout]:
        x = self.patch_embed(x)  # B x H x W x C
        layout = TokenLayout(x.shape[1:3])
        x = x.flatten(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.position_embedding(layout.map_size))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
        return x, layout


class PyramidVisionTransformer(nn.Module):
    """PVT v1. forward_features: the last stage's tokens, normalised, the class token first (B x (1 + N)
    x C); the classifier reads the class token (global_pool 'token') or the mean of the others ('avg')."""

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
    ):
        super().__init__()
        for name, value in dict(
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        ).items():
            MODEL_ARGUMENTS[name].check(value, name)
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be one of ('token', 'avg', ''), got {global_pool!r}")
        if sr_ratios[-1] != 1:
            raise ValueError("PVT v1's class token has no place on a map: sr_ratios[-1] must be 1")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        img_size = to_2tuple(img_size)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.stages = nn.ModuleList(
            [
                PvtStage(
                    patch_embed=ConvDownsample(
                        in_channels=in_chans if i == 0 else embed_dims[i - 1],
                        out_channels=embed_dims[i],
                        kernel_size=4 if i == 0 else 2,
                        stride=4 if i == 0 else 2,
                    ),
                    dim=embed_dims[i],
                    depth=depths[i],
                    grid_size=(img_size[0] // (4 * 2**i), img_size[1] // (4 * 2**i)),
                    num_heads=num_heads[i],
                    sr_ratio=sr_ratios[i],
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    class_token=i == 3,
                )
                for i in range(4)
            ]
        )
        self.norm = _BlockNorm(embed_dims[-1])
        self.feature_info = [
            dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}") for i, dim in enumerate(embed_dims)
        ]
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
        trunc_normal_(self.stages[3].cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Linear layers truncated normal (std 0.02, zero bias), as the PVT code has them."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _run_stages(self, x: Tensor, last: int, take: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        maps = []
        for index, stage in enumerate(self.stages[: last + 1]):
            x, layout = stage(x)
            tokens = x[:, stage.num_prefix_tokens :]
            if index in take:
                maps.append(layout.to_map(tokens))
            if index < last:
                x = layout.to_map(tokens)
        return x, maps

    def forward_features(self, x: Tensor) -> Tensor:
        check_images(x, self.in_chans)
        x, _ = self._run_stages(x, len(self.stages) - 1)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.stages[-1].num_prefix_tokens :].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage maps (strides 4 to 32, class token left out), B x C x H x W; and the final tokens."""
        if output_fmt != "NCHW":
            raise ValueError("PVT returns NCHW feature maps")
        check_images(x, self.in_chans)
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if stop_early or intermediates_only else len(self.stages) - 1
        x, maps = self._run_stages(x, last, take)
        if intermediates_only:
            return maps
        return (self.norm(x) if last == len(self.stages) - 1 else x), maps

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        param = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else next(self.parameters())
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head = head.to(device=param.device, dtype=param.dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith(("pos_embed", "cls_token"))}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\.0\.(patch_embed|pos_embed)", blocks=r"^stages\.(\d+)")


_SIZES = {
    "tiny": (2, 2, 2, 2),
    "small": (3, 4, 6, 3),
    "medium": (3, 4, 18, 3),
    "large": (3, 8, 27, 3),
}

default_cfgs = generate_default_cfgs(
    {f"pvt_{size}": hafa_cfg(first_conv="stages.0.patch_embed.proj", classifier="head") for size in _SIZES}
)


def _create(size: str, pretrained: bool, **kwargs) -> PyramidVisionTransformer:
    from ..pretrained import checkpoint_filter_fn

    return build_model_with_cfg(
        PyramidVisionTransformer,
        f"pvt_{size}",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=kwargs.pop("out_indices", (0, 1, 2, 3))),
        **{"depths": _SIZES[size], **kwargs},
    )


@register_model
def pvt_tiny(pretrained=False, **kwargs) -> PyramidVisionTransformer:
    return _create("tiny", pretrained, **kwargs)


@register_model
def pvt_small(pretrained=False, **kwargs) -> PyramidVisionTransformer:
    return _create("small", pretrained, **kwargs)


@register_model
def pvt_medium(pretrained=False, **kwargs) -> PyramidVisionTransformer:
    return _create("medium", pretrained, **kwargs)


@register_model
def pvt_large(pretrained=False, **kwargs) -> PyramidVisionTransformer:
    return _create("large", pretrained, **kwargs)
