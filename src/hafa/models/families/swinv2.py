"""Swin Transformer v2 (timm's SwinTransformerV2) as a HAFA family.

Runs as Swin (hafa.models.families.swin: NHWC stages, the stem padded for any size, the final norm and
the head) but for v2's layers. Transitions `layers.{1,2,3}.downsample`: v2's patch merging, the linear
over each 2x2 block, then a LayerNorm over its 2C outputs; its LAA form moves the four points and keeps
that norm with laa_norm="baseline" (BatchNorm and GELU in its place with "batch"). SIA projects with
that patch merging, map to map. After SIA the blocks stay residual post-norm, x + norm1(attn(x)), and
attend globally with v2's cosine attention over the merged tokens: q and kv are views of the fused qkv
weight, timm's q_bias, v_bias and logit_scale are kept; the continuous position bias (`cpb_mlp`, an MLP
of grid offsets inside a window) has no meaning without a grid and is left out. Grid blocks built for
any input size (dynamic_mask) keep their shifted-window mask per size. timm's SwinTransformerV2Cr is
another class with other layers, not this family.
"""

import math
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import PatchMerging, SwinTransformerV2, SwinTransformerV2Block
from torch import Tensor, nn

from ...layers import Block
from ...layers.attention import KeyValues
from ...ops import TokenLayout
from ..family import adopt, split_qkv
from .swin import CachedMask, MapToMap, Swin

# timm's clamp of the learned logit scale: exp(logit_scale) is at most 100.
MAX_LOGIT_SCALE = math.log(100.0)


class PatchMergingMap(MapToMap, PatchMerging):
    """timm's v2 patch merging from map to map."""


class CachedMaskSwinV2Block(CachedMask, SwinTransformerV2Block):
    """timm's Swin v2 block whose shifted-window mask is kept per input size."""


def cached_mask_block(block: SwinTransformerV2Block) -> CachedMaskSwinV2Block:
    """A block that rebuilds its mask in every forward (dynamic_mask) as a CachedMaskSwinV2Block with its weights."""
    attn = block.attn
    config = dict(
        dim=block.dim,
        input_resolution=block.input_resolution,
        num_heads=block.num_heads,
        window_size=block.window_size,
        shift_size=block.target_shift_size,
        always_partition=block.always_partition,
        dynamic_mask=True,
        mlp_ratio=block.mlp_ratio,
        qkv_bias=attn.q_bias is not None,
        proj_drop=attn.proj_drop.p,
        attn_drop=attn.attn_drop.p,
        drop_path=getattr(block.drop_path1, "drop_prob", 0.0),
        act_layer=type(block.mlp.act),
        norm_layer=partial(type(block.norm1), eps=block.norm1.eps),
        pretrained_window_size=attn.pretrained_window_size,
    )
    with torch.device("meta"):
        cached = CachedMaskSwinV2Block(**config)
    return adopt(cached, block)


class CosineAttention(nn.Module):
    """Swin v2's attention without windows: softmax(exp(logit_scale) * cos(q, k)) v over all the keys.

    q: dim -> dim and kv: dim -> 2 dim projections without bias (views of timm's fused qkv); q_bias and
    v_bias: timm's (None without qkv_bias; keys have no bias: a constant shift of k would change the
    cosines); logit_scale: num_heads x 1 x 1, clamped as timm's.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        q: nn.Linear,
        kv: nn.Linear,
        proj: nn.Module,
        logit_scale: nn.Parameter,
        q_bias: nn.Parameter | None = None,
        v_bias: nn.Parameter | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.proj = q, kv, proj
        self.logit_scale = logit_scale
        self.q_bias, self.v_bias = q_bias, v_bias
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None = None) -> Tensor:
        """x: B x N x C queries; kv: (B x L x C tokens, their layout), default x itself. -> B x N x C."""
        B, N, _ = x.shape
        source = x if kv is None else kv[0]
        heads = self.num_heads
        q = F.linear(x, self.q.weight, self.q_bias).view(B, N, heads, -1).transpose(1, 2)
        k, v = self.kv(source).view(B, source.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        if self.v_bias is not None:
            v = v + self.v_bias.view(heads, 1, -1)
        logit_scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        q, k = F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1)
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=1.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, -1)))


def cosine_attention(attention: nn.Module) -> CosineAttention:
    """timm's v2 window attention as cosine attention over tokens, with its weights (not its position bias)."""
    q, kv = split_qkv(attention.qkv)
    return CosineAttention(
        num_heads=attention.num_heads,
        q=q,
        kv=kv,
        proj=attention.proj,
        logit_scale=attention.logit_scale,
        q_bias=attention.q_bias,
        v_bias=attention.v_bias,
        attn_drop=attention.attn_drop.p,
        proj_drop=attention.proj_drop.p,
    )


def clustered_block(block: SwinTransformerV2Block) -> Block:
    """A Swin v2 block (post-norm) attending globally over merged tokens, with the block's own layers."""
    return Block(
        norm1=block.norm1,
        attn=cosine_attention(block.attn),
        norm2=block.norm2,
        mlp=block.mlp,
        drop_path1=block.drop_path1,
        drop_path2=block.drop_path2,
        post_norm=True,
    )


def patch_merging_map(merging: PatchMerging) -> PatchMergingMap:
    """The patch merging from map to map, holding its own reduction and norm."""
    with torch.device("meta"):
        as_map = PatchMergingMap(dim=merging.dim, out_dim=merging.out_dim)
    return adopt(as_map, merging)


class SwinV2(Swin):
    name = "swinv2"
    model_classes = (SwinTransformerV2,)
    model_names = tuple(timm.list_models(module="swin_transformer_v2"))
    baseline_weights = {}
    norm_first = False
    cached_block = staticmethod(cached_mask_block)
    clustered_block = staticmethod(clustered_block)
    merging_map = staticmethod(patch_merging_map)

    def checkpoint_names(self, state_dict: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """A baseline's patch merging at a SIA transition is SIA's projection, its norm included: that norm
        has the shape of SIA's own norm, so the generic move (by shape) would leave it there."""
        renamed = {}
        for name, tensor in super().checkpoint_names(state_dict, targets).items():
            owner, _, leaf = name.partition(".downsample.")
            inside = f"{owner}.downsample.proj.{leaf}"
            if leaf and inside in targets and inside not in state_dict:
                name = inside
            renamed[name] = tensor
        return renamed


FAMILY = SwinV2()
