"""TinyViT (timm's TinyVit: tiny_vit_*) as a HAFA family.

Stage 1 is convolutions (MBConv blocks), stages 2-4 attend in windows. Transitions `stages.{1,2,3}.
downsample`: PatchMerging, a 1x1 conv, a depthwise 3x3/s2/p1 conv `conv2.conv` and a 1x1 conv, each
followed by BatchNorm (and GELU after the first two), NCHW in and out. Its LAA form reads the depthwise
strided conv at learned offsets (hafa.layers.DeformableConv2d, the conv's names, always in its
"baseline" mode); the BatchNorm and GELU after it stay in both LAA modes: they are the norm and
activation laa_norm="batch" would add, and the model's own (so the conversion is the model exactly).
Stages take and give NCHW maps, so the Family defaults run them.

SIA projects with the whole PatchMerging, map to map, and normalises the merged tokens with a
LayerNorm of its own. After SIA each block keeps its layers: its windowed attention (a LayerNorm inside,
a fused qkv laid out per head as q, k, v of key, key and value widths) attends globally over the merged
tokens, the first block's to SIA's keys/values (normalised by the attention's norm as the queries); its
per-window attention biases (a bias of grid offsets) are left out; the depthwise conv between attention
and MLP (its output replaces the tokens) paints them onto the map and reads them back through the
dictionary. The head (pool, LayerNorm2d, fc) runs on the merged tokens as on a B x C x N x 1 map.
"""

import timm
import torch
import torch.nn.functional as F
from timm.models.tiny_vit import PatchMerging, TinyVit, TinyVitBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...layers import SIA, DeformableConv2d, HafaOptions
from ...layers.attention import KeyValues
from ...ops import TokenLayout
from ..family import ClusteredStage, Family, map_head_on_tokens, run_blocks, run_sia


class GlobalAttention(nn.Module):
    """TinyViT's attention (LayerNorm, a fused qkv laid out per head, proj) over all tokens, the
    per-window biases left out: to keys/values of another token set when given. B x N x C -> B x N x C."""

    def __init__(self, *, attention: nn.Module):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = attention.num_heads, attention.key_dim, attention.val_dim
        self.norm, self.qkv, self.proj = attention.norm, attention.qkv, attention.proj

    def _heads(self, x: Tensor, parts: slice) -> Tensor:
        """The part `parts` of each head's qkv of x: B x heads x N x width."""
        weight = self.qkv.weight.view(self.num_heads, -1, x.shape[-1])[:, parts]
        bias = None if self.qkv.bias is None else self.qkv.bias.view(self.num_heads, -1)[:, parts].flatten()
        out = F.linear(x, weight.flatten(0, 1), bias)
        return out.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None = None) -> Tensor:
        B, N, _ = x.shape
        x = self.norm(x)
        widths = [self.key_dim, self.key_dim, self.val_dim]
        if kv is None:
            q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).transpose(1, 2).split(widths, dim=-1)
        else:
            q = self._heads(x, slice(0, self.key_dim))
            k, v = self._heads(self.norm(kv[0]), slice(self.key_dim, None)).split(widths[1:], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # scale key_dim ** -0.5, as timm's
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class ClusteredBlock(nn.Module):
    """A TinyViT block on tokens with their layout, with the block's own layers (and names):
    x + attn(x) (global), the depthwise conv through the dictionary, x + mlp(x). B x N x C -> B x N x C."""

    def __init__(self, *, block: TinyVitBlock):
        super().__init__()
        self.attn = GlobalAttention(attention=block.attn)
        self.drop_path1, self.local_conv = block.drop_path1, block.local_conv
        self.mlp, self.drop_path2 = block.mlp, block.drop_path2

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None = None) -> Tensor:
        x = x + self.drop_path1(self.attn(x, layout, kv))
        x = layout.to_tokens(self.local_conv(layout.to_map(x)))
        return x + self.drop_path2(self.mlp(x))


def patch_merging(model: nn.Module, index: int) -> PatchMerging:
    transition = model.stages[index].downsample if index > 0 else None
    if not isinstance(transition, PatchMerging):
        raise ValueError(f"tiny_vit's stage {index + 1} has no patch merging for LAA or SIA; keep it 'conv'")
    return transition


class TinyViTFamily(Family):
    name = "tiny_vit"
    model_names = tuple(timm.list_models(module="tiny_vit"))
    model_classes = (TinyVit,)

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.patch_embed(images)

    def run_stage(self, model: nn.Module, index: int, x: Tensor) -> Tensor:
        stage = model.stages[index]
        if model.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def run_clustered_stage(
        self, model: nn.Module, index: int, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None
    ) -> tuple[Tensor, TokenLayout]:
        stage = model.stages[index]  # timm's TinyViT checkpoints per model, not per stage
        x, layout, kv = run_sia(stage.downsample, x, layout, padding_mask)
        return run_blocks(stage.blocks, x, layout, kv, model.grad_checkpointing), layout

    token_pools = None  # the head's own pooling layer pools the tokens, whatever its pool type

    def token_head(self, model: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
        return map_head_on_tokens(model.head, tokens, pre_logits)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return {i for i, stage in enumerate(model.stages) if any(isinstance(b, TinyVitBlock) for b in stage.blocks)}

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        merging = patch_merging(model, index)
        merging.conv2.conv = DeformableConv2d.from_conv(merging.conv2.conv, "baseline")  # its norm follows

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        stage = model.stages[index]
        merging = patch_merging(model, index)
        in_dim, out_dim = merging.conv1.conv.in_channels, merging.conv3.conv.out_channels
        with torch.device(merging.conv1.conv.weight.device):
            sia = SIA(in_dim=in_dim, out_dim=out_dim, proj=merging, options=options)
        blocks = nn.ModuleList(ClusteredBlock(block=block) for block in stage.blocks)
        model.stages[index] = ClusteredStage(sia=sia, blocks=blocks)


FAMILY = TinyViTFamily()
