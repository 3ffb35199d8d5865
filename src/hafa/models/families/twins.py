"""Twins (timm's Twins: twins_pcpvt_*, twins_svt_*) as a HAFA family.

Twins has no stage modules: stage k is patch_embeds[k] (a conv, then a LayerNorm, giving tokens and
their grid size), pos_drops[k], blocks[k] and pos_block[k], a PEG (a depthwise conv added to its
input) after the first block, glued together in Twins.forward_features; this family runs that loop
stage by stage. Stages take and give NCHW maps (the first takes the images: each stage starts with its
own patch embedding); the features are the last stage's tokens, normalised, as timm's. Transitions
`patch_embeds.{1,2,3}` (conv 2x2/s2): their LAA form keeps the names proj / norm (hafa.layers.LAA,
NHWC out). SIA projects with that conv (odd sides padded, see EvenPaddedConv2d) and normalises with
that norm. After SIA the blocks keep their layers: global sub-sampled attention (separate q and kv,
its sr through the dictionary) as it is, svt's locally-grouped attention (windows of a grid) as global
attention (q and kv views of its fused qkv), and the PEG paints and reads the merged tokens through the
dictionary. timm refuses gradient checkpointing for Twins (set_grad_checkpointing(True) raises), and
so does its HAFA form.
"""

import timm
import torch
import torch.nn.functional as F
from timm.models.twins import GlobalSubSampleAttn, Twins
from torch import Tensor, nn

from ...layers import LAA, SIA, Attention, Block, HafaOptions
from ...ops import TokenLayout
from ..family import Family, fused_qkv_attention, run_blocks, run_sia, subsampled_attention


class EvenPaddedConv2d(nn.Conv2d):
    """A patchifying conv (kernel = stride s) whose input is padded with zeros at the bottom / right to a
    multiple of s: where the conv alone floors odd sides, this rounds them up, as SIA's keys/values path
    does (SIA needs both at the same size). B x Cin x H x W -> B x Cout x ceil(H/s) x ceil(W/s)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "EvenPaddedConv2d":
        """conv's padded form, holding conv's own weight and bias tensors."""
        geometry = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding)
        with torch.device("meta"):
            padded = cls(
                in_channels=conv.in_channels, out_channels=conv.out_channels, bias=conv.bias is not None, **geometry
            )
        padded.weight, padded.bias = conv.weight, conv.bias
        return padded

    def forward(self, x: Tensor) -> Tensor:
        (stride_h, stride_w), (height, width) = self.stride, x.shape[-2:]
        return super().forward(F.pad(x, (0, -width % stride_w, 0, -height % stride_h)))


class DictionaryPosConv(nn.Module):
    """timm's PEG on tokens with their layout: x + the tokens of its depthwise conv (`proj`, timm's) on
    the map painted through the dictionary. B x N x C -> B x N x C."""

    def __init__(self, *, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return x + layout.to_tokens(self.proj(layout.to_map(x)))


def _attention(attention: nn.Module) -> Attention:
    """A Twins attention over tokens with a layout, with its own layers: global sub-sampled attention as it
    is, locally-grouped attention (fused qkv, windows) as global attention."""
    if isinstance(attention, GlobalSubSampleAttn):
        return subsampled_attention(attention)
    return fused_qkv_attention(attention)


def clustered_block(block: nn.Module) -> Block:
    """A Twins block (pre-norm) running on tokens with a layout, with the block's own layers."""
    return Block(
        norm1=block.norm1,
        attn=_attention(block.attn),
        norm2=block.norm2,
        mlp=block.mlp,
        drop_path1=block.drop_path1,
        drop_path2=block.drop_path2,
    )


def embedded_tokens(embed: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """A stage's patch embedding on a B x C x H x W map -> (B x N x C' tokens, their grid size): timm's
    gives that pair, its LAA form an NHWC map."""
    if isinstance(embed, LAA):
        out = embed(x)
        return out.flatten(1, 2), (out.shape[1], out.shape[2])
    return embed(x)


class TwinsFamily(Family):
    name = "twins"
    model_classes = (Twins,)
    model_names = tuple(timm.list_models(module="twins"))
    stage_parts = ("patch_embeds", "pos_drops", "blocks", "pos_block")

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return images  # patch_embeds.0 opens stage 0

    def run_stage(self, model: nn.Module, index: int, x: Tensor) -> Tensor:
        tokens, size = embedded_tokens(model.patch_embeds[index], x)
        tokens = model.pos_drops[index](tokens)
        for j, block in enumerate(model.blocks[index]):
            tokens = block(tokens, size)
            if j == 0:
                tokens = model.pos_block[index](tokens, size)
        return tokens.reshape(x.shape[0], *size, -1).permute(0, 3, 1, 2).contiguous()

    def to_nchw(self, model: nn.Module, index: int, x: Tensor) -> Tensor:
        if x.dim() != 4:
            # HafaModel hands its final features here for forward_intermediates(norm=True), and Twins'
            # features are tokens, without their grid size.
            raise ValueError(
                "a HAFA Twins model whose last stage is a grid gives its last map unnormalised only "
                "(forward_intermediates with norm=False); with SIA before the last stage norm=True works"
            )
        return x

    def grid_features(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.norm(x.flatten(2).transpose(1, 2))

    def token_features(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return model.norm(tokens)

    def token_head(self, model: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
        self.check_token_pool(model.global_pool)
        return Twins.forward_head(model, tokens, pre_logits=pre_logits)  # timm's head mean-pools tokens

    def attention_stages(self, model: nn.Module) -> set[int]:
        return {0, 1, 2, 3}

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        embed = model.patch_embeds[index]
        model.patch_embeds[index] = LAA.from_downsample(embed.proj, embed.norm, laa_norm)

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        embed = model.patch_embeds[index]
        proj = EvenPaddedConv2d.from_conv(embed.proj)
        with torch.device(proj.weight.device):
            sia = SIA(in_dim=proj.in_channels, out_dim=proj.out_channels, proj=proj, norm=embed.norm, options=options)
        model.patch_embeds[index] = sia
        model.blocks[index] = nn.ModuleList(clustered_block(block) for block in model.blocks[index])
        model.pos_block[index] = DictionaryPosConv(proj=model.pos_block[index].proj)

    def run_clustered_stage(
        self, model: nn.Module, index: int, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None
    ) -> tuple[Tensor, TokenLayout]:
        x, layout, kv = run_sia(model.patch_embeds[index], x, layout, padding_mask)
        x = model.pos_drops[index](x)
        blocks = model.blocks[index]  # never checkpointed: timm's Twins refuses gradient checkpointing
        x = run_blocks(blocks[:1], x, layout, kv, use_checkpoint=False)
        x = model.pos_block[index](x, layout)
        return run_blocks(blocks[1:], x, layout, None, use_checkpoint=False), layout

    def prune(self, model: nn.Module, max_index: int) -> None:
        for part in self.stage_parts:
            setattr(model, part, getattr(model, part)[: max_index + 1])


FAMILY = TwinsFamily()
