"""Swin Transformer with Hierarchy Aware Feature Aggregation.

`hafa_swin_tiny_patch4_window7_224`, `_small_`, `_base_`. Patch merging (concatenate each 2x2
block, LayerNorm, linear) reads a fixed 2x2 grid: a 2x2/s2 kernel. Its LAA form samples those four
points at learned offsets before the same norm and linear, so timm's Swin weights load unchanged
and, with zero offsets, reproduce the baseline exactly. Stages on a grid are timm's own Swin blocks.

After SIA, the stage's blocks attend globally over the merged tokens: windows are squares of a
grid, and merged tokens have no grid order to cut into windows (the dictionary can paint them onto
a map, but a token spread over several windows would then be updated several times and averaged).
At 224 x 224 the last stage is a single 7 x 7 window, so global attention is what Swin computes
there anyway; the merged stage holds a quarter of the tokens, which keeps global attention cheap at
detection sizes. Those blocks have separate q and kv projections (for SIA's keys/values); a
checkpoint's fused qkv is split into them on loading.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import LAA, SIA, Block, deformable_samples
from ..layers.laa import zero_offsets_
from ..ops import TokenLayout
from ..pretrained import checkpoint_filter_fn
from ._base import HAFA_AGGREGATION, HafaBackbone, check_stage_aggregation, hafa_cfg, run_blocks, run_downsample

__all__ = ["HafaSwin"]


class GridPatchMerging(PatchMerging):
    """timm's patch merging, fed a B x C x H x W map like the other downsamplings."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1))


class LAAPatchMerging(nn.Module):
    """Patch merging whose four 2x2 points move by learned offsets (zero at start).

    B x C x H x W -> B x ceil(H/2) x ceil(W/2) x out_dim. Parameters: offset (new), norm and reduction (timm's).
    """

    def __init__(self, dim: int, out_dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.offset = nn.Conv2d(dim, 8, 2, 2)
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.reset_offsets()

    def reset_offsets(self) -> None:
        zero_offsets_(self.offset)

    def forward(self, x: Tensor, return_offsets: bool = False):
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        offsets = self.offset(x)
        samples = deformable_samples(x, offsets, 2, 2, 0)  # B, C, (ky, kx), Ho, Wo
        B, C, _, Ho, Wo = samples.shape
        # timm concatenates the 2x2 block as (kx, ky, C)
        merged = samples.view(B, C, 2, 2, Ho, Wo).permute(0, 4, 5, 3, 2, 1).reshape(B, Ho, Wo, 4 * C)
        out = self.reduction(self.norm(merged))
        return (out, offsets) if return_offsets else out


class SwinStage(nn.Module):
    """Downsampling (none for the first stage), then timm's windowed Swin blocks on a grid, or
    global-attention blocks over merged tokens after SIA."""

    def __init__(
        self,
        dim,
        out_dim,
        depth,
        aggregation,
        input_resolution,
        num_heads,
        window_size,
        mlp_ratio,
        qkv_bias,
        proj_drop,
        attn_drop,
        drop_path,
        sia_args,
    ):
        super().__init__()
        self.grad_checkpointing = False
        if aggregation is None:
            self.downsample = None
        elif aggregation == "sia":
            self.downsample = SIA(dim, out_dim, **sia_args)
        else:
            self.downsample = (LAAPatchMerging if aggregation == "laa" else GridPatchMerging)(dim, out_dim)
        self.windowed = aggregation != "sia"
        if self.windowed:
            window_size = to_2tuple(window_size)
            self.blocks = nn.ModuleList(
                [
                    SwinTransformerBlock(
                        out_dim,
                        input_resolution,
                        num_heads,
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
                        out_dim,
                        num_heads,
                        mlp_ratio,
                        1,
                        False,
                        qkv_bias,
                        proj_drop,
                        attn_drop,
                        drop_path[i],
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
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.stage_aggregation = check_stage_aggregation(stage_aggregation)
        sia_args = dict(cluster_ratio=cluster_ratio, knn_k=knn_k, cluster_qkv=cluster_qkv)
        dims = [embed_dim * 2**i for i in range(4)]
        self.patch_embed = PatchEmbed(
            img_size,
            patch_size,
            in_chans,
            dims[0],
            norm_layer=nn.LayerNorm,
            strict_img_size=False,
            dynamic_img_pad=True,
            output_fmt="NHWC",
        )
        grid = self.patch_embed.grid_size
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        aggregation = (None,) + self.stage_aggregation
        self.layers = nn.ModuleList(
            [
                SwinStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    aggregation[i],
                    (-(-grid[0] // 2**i), -(-grid[1] // 2**i)),
                    num_heads[i],
                    window_size,
                    mlp_ratio,
                    qkv_bias,
                    proj_drop_rate,
                    attn_drop_rate,
                    dpr[i],
                    sia_args,
                )
                for i in range(4)
            ]
        )
        self.feature_info = [dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"layers.{i}") for i in range(4)]
        self.norm = nn.LayerNorm(dims[-1])
        self.num_features = self.head_hidden_size = dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (LAA, LAAPatchMerging)):
            m.reset_offsets()

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


def _create(variant: str, pretrained: bool = False, **kwargs) -> HafaSwin:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        HafaSwin,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        f"hafa_swin_{size}_patch4_window7_224": hafa_cfg(first_conv="patch_embed.proj", classifier="head.fc")
        for size in ("tiny", "small", "base")
    }
)


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
