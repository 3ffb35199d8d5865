"""Swin Transformer (timm's SwinTransformer) as a HAFA family.

Transitions `layers.{1,2,3}.downsample`: patch merging (each 2x2 block concatenated, a LayerNorm over
the 4C values, a linear; NHWC in and out); its LAA form moves the four points (hafa.layers.
LAAPatchMerging, keeping norm and reduction). SIA projects with that patch merging, map to map.
Stages take and give NHWC maps; windows are padded by timm for any size. After SIA the blocks attend
globally over the merged tokens (windows are squares of a grid, which merged tokens do not have; at
224 x 224 the last stage is one 7 x 7 window, so global attention is what Swin computes there anyway):
their fused qkv becomes separate q and kv (views of the same weights), the relative position bias
(a bias of grid offsets) has no meaning there and is left out. Checkpoints of the original Swin code
(a downsampling at the end of a stage, the classifier `head`) load with their names as timm's.
"""

import re
from functools import partial

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from torch import Tensor, nn

from ...layers import SIA, Block, HafaOptions, LAAPatchMerging
from ...ops.constants import shape_constant
from ..family import ChannelsLastFamily, ClusteredStage, adopt, fused_qkv_attention


class MapToMap:
    """For a timm patch merging (NHWC in and out): from map to map, B x C x H x W -> B x out_dim x
    ceil(H/2) x ceil(W/2), as SIA's projection takes it."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchMergingMap(MapToMap, PatchMerging):
    """timm's Swin patch merging from map to map."""


def _window_bands(size: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Which of a shifted-window layout's three bands each position of an axis is in, as timm's slices
    [0:-window], [-window:-shift], [-shift:] assign them (a later slice wins): size long."""
    position = torch.arange(size, device=device)
    band = torch.zeros_like(position)
    for index, (start, stop) in enumerate(((0, -window), (-window, -shift), (-shift, None))):
        first, last, _ = slice(start, stop).indices(size)
        band = torch.where((position >= first) & (position < last), index, band)
    return band


def shifted_window_mask(
    size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """timm's shifted-window attention mask for a padded H x W map: windows x A x A (A = window area),
    -100 between pixels of different regions of a window, else 0. Built from comparisons, not from timm's
    nine slice assignments, which a compiler takes long to lower."""
    (H, W), (wh, ww) = size, window
    region = _window_bands(H, wh, shift[0], device)[:, None] * 3 + _window_bands(W, ww, shift[1], device)
    windows = region.view(H // wh, wh, W // ww, ww).transpose(1, 2).reshape(-1, wh * ww)
    apart = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(apart.shape, device=device, dtype=dtype).masked_fill(apart, -100.0)


class CachedMask:
    """For a timm Swin block built for any input size (dynamic_mask): its shifted-window mask kept per
    size, as timm's fixed-size block keeps its one mask, instead of being rebuilt in every forward."""

    def get_attn_mask(self, x: Tensor | None = None, *args, **kwargs) -> Tensor | None:
        if x is None or not any(self.shift_size):
            return super().get_attn_mask(x, *args, **kwargs)
        size = tuple(x.shape[1:3])
        key = ("shifted_window_mask", self.window_size, self.shift_size, size, x.dtype)
        build = partial(shifted_window_mask, size, self.window_size, self.shift_size, x.device, x.dtype)
        return shape_constant(key, x.device, build)


class CachedMaskSwinBlock(CachedMask, SwinTransformerBlock):
    """timm's Swin block whose shifted-window mask is kept per input size."""


def cached_mask_block(block: SwinTransformerBlock) -> SwinTransformerBlock:
    """A block that rebuilds its mask in every forward (dynamic_mask) as a CachedMaskSwinBlock with its weights."""
    attn = block.attn
    config = dict(
        dim=block.dim,
        input_resolution=block.input_resolution,
        num_heads=attn.num_heads,
        head_dim=attn.qkv.out_features // 3 // attn.num_heads,
        window_size=block.window_size,
        shift_size=block.target_shift_size,
        always_partition=block.always_partition,
        dynamic_mask=True,
        mlp_ratio=block.mlp_ratio,
        qkv_bias=attn.qkv.bias is not None,
        proj_drop=attn.proj_drop.p,
        attn_drop=attn.attn_drop.p,
        drop_path=getattr(block.drop_path1, "drop_prob", 0.0),
        act_layer=type(block.mlp.act),
        norm_layer=partial(type(block.norm1), eps=block.norm1.eps),
    )
    with torch.device("meta"):
        cached = CachedMaskSwinBlock(**config)
    return adopt(cached, block)


def clustered_block(block: SwinTransformerBlock) -> Block:
    """A Swin block attending globally over merged tokens, with the block's own layers."""
    return Block(
        norm1=block.norm1,
        attn=fused_qkv_attention(block.attn),
        norm2=block.norm2,
        mlp=block.mlp,
        drop_path1=block.drop_path1,
        drop_path2=block.drop_path2,
    )


def patch_merging_map(merging: PatchMerging) -> PatchMergingMap:
    """The patch merging from map to map, holding its own reduction and norm."""
    with torch.device("meta"):
        as_map = PatchMergingMap(merging.dim, out_dim=merging.out_dim)
    return adopt(as_map, merging)


def timm_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The original Swin (v1 and v2) layout's names as timm's: a stage's closing downsampling as the next
    stage's opening one, the classifier `head` as `head.fc`; the buffers timm rebuilds left out."""
    if "layers.0.downsample.reduction.weight" in state_dict:
        state_dict = {
            re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v
            for k, v in state_dict.items()
        }
        state_dict = {
            ("head.fc." + k[5:] if k.startswith("head.") and not k.startswith("head.fc.") else k): v
            for k, v in state_dict.items()
        }
    return {k: v for k, v in state_dict.items() if not k.endswith(("relative_position_index", "attn_mask"))}


def any_size_stem(model: SwinTransformer) -> None:
    """The patch embedding padded to a multiple of the patch size, so that any input size works (timm's
    Swin takes sizes divisible by it), with its own layers."""
    stem = model.patch_embed
    with torch.device("meta"):
        padded = PatchEmbed(
            img_size=stem.img_size,
            patch_size=stem.patch_size,
            in_chans=stem.proj.in_channels,
            embed_dim=stem.proj.out_channels,
            norm_layer=None,
            strict_img_size=False,
            dynamic_img_pad=True,
            output_fmt="NHWC",
        )
    padded.proj, padded.norm = stem.proj, stem.norm
    model.patch_embed = padded


class Swin(ChannelsLastFamily):
    name = "swin"
    final_norm_name = "norm"
    model_classes = (SwinTransformer,)
    model_names = tuple(timm.list_models(module="swin_transformer"))
    baseline_weights = {
        f"swin_{size}_patch4_window7_224": dict(hf_hub_id=f"timm/swin_{size}_patch4_window7_224.ms_in1k")
        for size in ("tiny", "small", "base")
    }
    stages_name = "layers"
    # Swin v1's patch merging normalises the 4C concatenation before its linear (v2's: the linear's output)
    norm_first = True
    # v1's layers as a block that keeps its mask per size, a block on merged tokens, a patch merging from
    # map to map (Swin v2 names its own)
    cached_block = staticmethod(cached_mask_block)
    clustered_block = staticmethod(clustered_block)
    merging_map = staticmethod(patch_merging_map)

    def create(self, name: str, **kwargs) -> nn.Module:
        model = timm.create_model(name, **{"strict_img_size": False, **kwargs})
        any_size_stem(model)
        return model

    def prepare(self, model: nn.Module, stage_aggregation: tuple) -> None:
        for stage in model.layers:
            for i, block in enumerate(stage.blocks):
                if block.dynamic_mask and not isinstance(block, CachedMask):
                    stage.blocks[i] = self.cached_block(block)

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.patch_embed(images)

    def grid_features(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.norm(x)

    def token_features(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return model.norm(tokens)

    token_pools = None  # timm's ClassifierHead pools the tokens, whatever its pool type

    def token_head(self, model: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
        # the tokens as an N x 1 NHWC map: the head pools them as the positions of a map (avg, max, avgmax,
        # catavgmax ...); without pooling it gives a prediction per token
        x = model.head(tokens.unsqueeze(2), pre_logits=pre_logits)
        return x if model.head.global_pool.pool_type else x.squeeze(2)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return {0, 1, 2, 3}

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        stage = model.layers[index]
        stage.downsample = LAAPatchMerging.from_patch_merging(stage.downsample, laa_norm, norm_first=self.norm_first)

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        stage = model.layers[index]
        merging = stage.downsample
        with torch.device(merging.reduction.weight.device):
            sia = SIA(in_dim=merging.dim, out_dim=merging.out_dim, proj=self.merging_map(merging), options=options)
        blocks = nn.ModuleList(self.clustered_block(block) for block in stage.blocks)
        model.layers[index] = ClusteredStage(sia=sia, blocks=blocks)

    def checkpoint_names(self, state_dict: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return timm_names(state_dict)


FAMILY = Swin()
