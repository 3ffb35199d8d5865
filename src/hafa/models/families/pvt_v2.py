"""PVT v2 (timm's PyramidVisionTransformerV2) as a HAFA family.

Transitions `stages.{1,2,3}.downsample`: OverlapPatchEmbed, a 3x3/s2/p1 conv `proj` then a LayerNorm
`norm` (NCHW in, NHWC out); its LAA form keeps both names (hafa.layers.LAA). SIA projects with that
conv and normalises with that norm. Stages take NCHW maps (the first the stem's NHWC) and give NCHW.
After SIA each block keeps its layers: attention with separate q and kv (spatial reduction of the
keys/values through the dictionary), the MLP's depthwise conv through the dictionary.
"""

import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import Tensor, nn

from ...layers import LAA, SIA, Block, DepthwiseConvMlp
from ..convert import ClusteredStage, Family, subsampled_attention


def _mlp(mlp: nn.Module) -> DepthwiseConvMlp:
    """timm's MLP with a depthwise conv, with its own layers; the conv reads the map through the dictionary."""
    return DepthwiseConvMlp(fc1=mlp.fc1, dwconv=mlp.dwconv, fc2=mlp.fc2, relu=mlp.relu, act=mlp.act, drop=mlp.drop)


def clustered_block(block: nn.Module) -> Block:
    """A PVT v2 block (timm's) running on tokens with a layout, with the block's own layers."""
    return Block(
        norm1=block.norm1,
        attn=subsampled_attention(block.attn),
        norm2=block.norm2,
        mlp=_mlp(block.mlp),
        drop_path1=block.drop_path1,
        drop_path2=block.drop_path2,
    )


class PvtV2(Family):
    name = "pvt_v2"
    model_classes = (PyramidVisionTransformerV2,)

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.patch_embed(images)  # NHWC, as the first stage takes it

    def attention_stages(self, model: nn.Module) -> set[int]:
        return {0, 1, 2, 3}

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        stage = model.stages[index]
        stage.downsample = LAA.from_downsample(stage.downsample.proj, stage.downsample.norm, laa_norm)

    def convert_sia(self, model: nn.Module, index: int, sia_args: dict, laa_norm: str) -> None:
        stage = model.stages[index]
        proj = stage.downsample.proj
        with torch.device(proj.weight.device):
            sia = SIA(
                in_dim=proj.in_channels, out_dim=proj.out_channels, proj=proj, norm=stage.downsample.norm, **sia_args
            )
        blocks = nn.ModuleList(clustered_block(block) for block in stage.blocks)
        model.stages[index] = ClusteredStage(sia=sia, blocks=blocks, norm=stage.norm)


FAMILY = PvtV2()
TIMM_MODULES = {"pvt_v2": "pvt_v2"}
