"""GCViT (timm's GlobalContextVit: gcvit_*) as a HAFA family.

GCViT takes the input size it was built for (img_size: its windows and its global queries are sized
from it), as timm's. Transitions `stages.{1,2,3}.downsample`: Downsample2d, a LayerNorm2d, an MBConv, a
3x3/s2/p1 conv `reduction` and a LayerNorm2d `norm2`, NCHW in and out; its LAA form replaces the conv
(hafa.layers.DeformableConv2d, keeping its names), and with laa_norm="batch" LAA's BatchNorm and GELU
take the place of norm2 (left out); the norm and MBConv before the conv stay. Stages take and give NCHW
maps, so the Family defaults run them; every stage attends.

A stage computes one global query map from its input (`global_block`: MBConvs pooling the map to the
window size), which every second block uses, in every window, as the queries at the window's positions
(the other blocks attend within windows with their own queries). SIA projects with the whole
Downsample2d, map to map, and normalises the merged tokens with a LayerNorm of its own. After SIA the
blocks attend globally over the merged tokens, with their layers: a local block's fused qkv as q and kv
(views of its weight), the first one attending to SIA's keys/values; a global block's queries are its
global query map computed from the merged tokens painted onto the map, tiled over the map as the
windows tile it and read back through the dictionary. Their relative position biases (of window
offsets) are left out. The head (pool, fc) runs on the merged tokens as on a B x C x N x 1 map; without
pooling (global_pool '') it predicts for each token.
"""

import math

import timm
import torch
import torch.nn.functional as F
from timm.models.gcvit import Downsample2d, GlobalContextVit, GlobalContextVitBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...layers import SIA, DeformableConv2d, HafaOptions
from ...layers.attention import KeyValues
from ...ops import TokenLayout
from ..family import Family, fused_qkv_attention, map_head_on_tokens, run_sia


class GlobalQueryAttention(nn.Module):
    """GCViT's global-query attention over all tokens: keys and values from its `qkv` (dim -> 2 dim),
    the queries given (B x N x C, one for each token). B x N x C -> B x N x C."""

    def __init__(self, *, attention: nn.Module):
        super().__init__()
        self.num_heads, self.scale = attention.num_heads, attention.scale
        self.qkv, self.attn_drop, self.proj, self.proj_drop = (
            attention.qkv,
            attention.attn_drop,
            attention.proj,
            attention.proj_drop,
        )

    def forward(self, x: Tensor, queries: Tensor) -> Tensor:
        B, N, C = x.shape
        k, v = self.qkv(x).view(B, N, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q = queries.view(B, N, self.num_heads, -1).transpose(1, 2)
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class ClusteredBlock(nn.Module):
    """A GCViT block on tokens with their layout, with the block's own layers (and names): x +
    ls1(attn(norm1(x))), x + ls2(mlp(norm2(x))); a local block attends to kv when given (normalised by
    norm1 as x), a global block with the given queries. B x N x C -> B x N x C."""

    def __init__(self, *, block: GlobalContextVitBlock):
        super().__init__()
        self.use_global = block.attn.use_global
        self.norm1 = block.norm1
        self.attn = GlobalQueryAttention(attention=block.attn) if self.use_global else fused_qkv_attention(block.attn)
        self.ls1, self.drop_path1 = block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None, queries: Tensor) -> Tensor:
        if self.use_global:
            y = self.attn(self.norm1(x), queries)
        else:
            if kv is not None:
                kv = (self.norm1(kv[0]), kv[1])
            y = self.attn(self.norm1(x), layout, kv)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ClusteredStage(nn.Module):
    """A GCViT stage that starts with SIA, under timm's names (downsample, global_block, global_norm,
    blocks, norm): the global queries from the merged tokens painted onto the map, then the blocks over
    the merged tokens. (B x N x C tokens, layout) -> (B x M x C' merged tokens, their layout)."""

    def __init__(self, *, sia: SIA, stage: nn.Module):
        super().__init__()
        self.downsample = sia
        self.global_block, self.global_norm, self.norm = stage.global_block, stage.global_norm, stage.norm
        self.blocks = nn.ModuleList(ClusteredBlock(block=block) for block in stage.blocks)
        self.grad_checkpointing = False

    def global_queries(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """The global query map (window-sized) of the tokens' map, tiled over the map, as tokens."""
        feature_map = layout.to_map(x)
        queries = self.global_norm(self.global_block(feature_map).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        (H, W), (h, w) = feature_map.shape[-2:], queries.shape[-2:]
        tiled = queries.repeat(1, 1, math.ceil(H / h), math.ceil(W / w))[..., :H, :W]
        return layout.to_tokens(tiled)

    def forward(self, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None = None):
        x, layout, kv = run_sia(self.downsample, x, layout, padding_mask)
        queries = self.global_queries(x, layout)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, layout, kv, queries, use_reentrant=False)
            else:
                x = block(x, layout, kv, queries)
            kv = None
        return self.norm(x), layout


def downsample(model: nn.Module, index: int) -> Downsample2d:
    transition = model.stages[index].downsample
    if not isinstance(transition, Downsample2d) or not isinstance(transition.reduction, nn.Conv2d):
        raise ValueError(
            f"gcvit's stages.{index}.downsample is {transition.__class__.__name__} without a strided conv, no "
            "downsampling for LAA or SIA; keep it 'conv'"
        )
    return transition


class GCViTFamily(Family):
    name = "gcvit"
    model_names = tuple(timm.list_models(module="gcvit"))
    model_classes = (GlobalContextVit,)

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        x = model.stem(images)
        built = tuple(model.stages[0].feat_size)
        if tuple(x.shape[-2:]) != built:
            size = (4 * built[0], 4 * built[1])
            raise ValueError(
                f"a gcvit model takes the input size it was built for ({size[0]} x {size[1]}: its windows and "
                f"global queries are sized from it), got {tuple(images.shape[-2:])}; build it with img_size"
            )
        return x

    token_pools = None  # the head's own pooling layer pools the tokens, whatever its pool type

    def token_head(self, model: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
        head = model.head
        if head.global_pool.pool_type:
            return map_head_on_tokens(head, tokens, pre_logits)
        # no pooling: a prediction per token (timm's head would apply its linear to a map's last axis)
        tokens = head.drop(tokens)
        return tokens if pre_logits else head.fc(tokens)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return set(range(len(model.stages)))

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        transition = downsample(model, index)
        try:
            transition.reduction = DeformableConv2d.from_conv(transition.reduction, laa_norm)
        except ValueError as error:
            raise ValueError(f"gcvit's stages.{index}.downsample: {error}") from error
        if laa_norm == "batch":
            transition.norm2 = nn.Identity()

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        transition = downsample(model, index)
        conv = transition.reduction
        with torch.device(conv.weight.device):
            sia = SIA(in_dim=conv.in_channels, out_dim=conv.out_channels, proj=transition, options=options)
        model.stages[index] = ClusteredStage(sia=sia, stage=model.stages[index])


FAMILY = GCViTFamily()
