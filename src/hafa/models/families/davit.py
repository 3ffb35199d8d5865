"""DaViT (timm's DaVit: davit_*, davit_*_fl) as a HAFA family.

Transitions `stages.{1,2,3}.downsample`: Downsample, a LayerNorm2d before a strided conv `conv` (2x2/s2,
the input padded at the bottom / right to even sides; 3x3/s2/p1 in the Florence-2 models), NCHW in and
out; its LAA form replaces only the conv (hafa.layers.DeformableConv2d, keeping the conv's names), the
norm before it stays. Stages take and give NCHW maps, so the Family defaults run them. Every stage
attends: each of its blocks is a spatial block (windowed attention) then a channel block (attention
over channels), each with a depthwise position conv before its attention and one before its MLP.

SIA projects with the whole Downsample, map to map, and normalises the merged tokens with a LayerNorm of
its own (the Downsample's norm is on its input). After SIA each block keeps its layers: the spatial
block's windowed attention becomes global attention over the merged tokens (its fused qkv as q and kv,
views of its weight; DaViT has no position bias), the channel attention runs as it is (it mixes
channels, whatever the tokens), and the position convs paint the merged tokens onto the map and read
them back through the dictionary. The first block's spatial attention attends to SIA's keys/values,
which pass the block's position conv and norm as the queries do. The head (pool, LayerNorm2d, fc; or
norm_pre and a plain head) runs on the merged tokens as on a B x C x N x 1 map.
"""

from collections import OrderedDict

import timm
import torch
from timm.models.davit import ChannelBlock, DaVit, Downsample, SpatialBlock
from torch import Tensor, nn

from ...layers import SIA, Attention, DeformableConv2d, HafaOptions
from ...layers.attention import KeyValues
from ...ops import TokenLayout
from ..family import ClusteredStage, Family, map_head_on_tokens, split_qkv, tokens_as_map


class DictionaryPosConv(nn.Module):
    """timm's ConvPosEnc on tokens with their layout: x + act(its depthwise conv `proj` on the map painted
    through the dictionary). B x N x C -> B x N x C."""

    def __init__(self, *, proj: nn.Module, act: nn.Module):
        super().__init__()
        self.proj, self.act = proj, act

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return x + self.act(layout.to_tokens(self.proj(layout.to_map(x))))


def global_attention(attention: nn.Module) -> Attention:
    """timm's DaViT window attention (fused qkv, no dropout, no position bias) as global attention over
    tokens, its qkv as q and kv views."""
    q, kv = split_qkv(attention.qkv)
    return Attention(num_heads=attention.num_heads, q=q, kv=kv, proj=attention.proj, scale=attention.scale)


class ClusteredBlock(nn.Module):
    """A DaViT spatial or channel block on tokens with their layout, with the block's own layers (and
    names): x = cpe1(x); x + attn(norm1(x)); x = cpe2(x); x + mlp(norm2(x)). A spatial block attends
    globally (to kv when given, passed through cpe1 and norm1 alike); a channel block mixes channels.
    B x N x C -> B x N x C."""

    def __init__(self, *, block: SpatialBlock | ChannelBlock):
        super().__init__()
        self.spatial = isinstance(block, SpatialBlock)
        self.cpe1 = DictionaryPosConv(proj=block.cpe1.proj, act=block.cpe1.act)
        self.norm1 = block.norm1
        self.attn = global_attention(block.attn) if self.spatial else block.attn
        self.drop_path1 = block.drop_path1
        self.cpe2 = DictionaryPosConv(proj=block.cpe2.proj, act=block.cpe2.act)
        self.norm2, self.mlp, self.drop_path2 = block.norm2, block.mlp, block.drop_path2

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None = None) -> Tensor:
        x = self.cpe1(x, layout)
        if self.spatial:
            if kv is not None:
                kv = (self.norm1(self.cpe1(*kv)), kv[1])
            y = self.attn(self.norm1(x), layout, kv)
        else:
            y = self.attn(self.norm1(x))
        x = self.cpe2(x + self.drop_path1(y), layout)
        if self.mlp is not None:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class ClusteredDualBlock(nn.Sequential):
    """One of a stage's blocks (a spatial and a channel block, under timm's names) on tokens with their
    layout; its first block attends to kv when given. B x N x C -> B x N x C."""

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None = None) -> Tensor:
        for block in self:
            x = block(x, layout, kv)
            kv = None
        return x


def clustered_dual_block(dual: nn.Sequential) -> ClusteredDualBlock:
    """A stage's block (timm's nn.Sequential of spatial and channel blocks) running on merged tokens."""
    return ClusteredDualBlock(OrderedDict((name, ClusteredBlock(block=block)) for name, block in dual.named_children()))


def downsample(model: nn.Module, index: int) -> Downsample:
    transition = model.stages[index].downsample
    if not isinstance(transition, Downsample):
        raise ValueError(
            f"davit's stages.{index}.downsample is {type(transition).__name__}, no downsampling for LAA or SIA; "
            "keep it 'conv'"
        )
    return transition


class DaViTFamily(Family):
    name = "davit"
    model_names = tuple(timm.list_models(module="davit"))
    final_norm_name = "norm_pre"
    model_classes = (DaVit,)

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.stem(images)

    def grid_features(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.norm_pre(x)

    def token_features(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return model.norm_pre(tokens_as_map(tokens)).squeeze(-1).transpose(1, 2)

    token_pools = None  # the head's own pooling layer pools the tokens, whatever its pool type

    def token_head(self, model: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
        return map_head_on_tokens(model.head, tokens, pre_logits)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return set(range(len(model.stages)))

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        transition = downsample(model, index)
        try:
            transition.conv = DeformableConv2d.from_conv(transition.conv, laa_norm)
        except ValueError as error:
            raise ValueError(f"davit's stages.{index}.downsample: {error}") from error

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        stage = model.stages[index]
        transition = downsample(model, index)
        first = next(iter(stage.blocks[0].children()))
        if not isinstance(first, SpatialBlock):
            raise ValueError(
                f"davit's stage {index + 1} starts with a {type(first).__name__}: SIA's keys/values need a first "
                "block with spatial attention (timm's attn_types starting with 'spatial'); keep it 'laa' or 'conv'"
            )
        conv = transition.conv
        with torch.device(conv.weight.device):
            sia = SIA(in_dim=conv.in_channels, out_dim=conv.out_channels, proj=transition, options=options)
        blocks = nn.ModuleList(clustered_dual_block(dual) for dual in stage.blocks)
        model.stages[index] = ClusteredStage(sia=sia, blocks=blocks)


FAMILY = DaViTFamily()
