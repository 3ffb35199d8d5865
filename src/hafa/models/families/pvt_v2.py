"""PVT v2 (timm's PyramidVisionTransformerV2) as a HAFA family.

Transitions `stages.{1,2,3}.downsample`: OverlapPatchEmbed, a 3x3/s2/p1 conv `proj` then a LayerNorm
`norm` (NCHW in, NHWC out); its LAA form keeps both names (hafa.layers.LAA). SIA projects with that
conv and normalises with that norm. Stages take NCHW maps (the first the stem's NHWC) and give NCHW.
After SIA each block keeps its layers: attention with separate q and kv (spatial reduction of the
keys/values through the dictionary), the MLP's depthwise conv through the dictionary. Checkpoints of
the official PVT code (and of the official HAFA code, whose LAA and SIA sit in its patch embeddings)
load with their names as timm's.
"""

import re

import timm
import torch
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import Tensor, nn

from ...layers import LAA, SIA, Block, DepthwiseConvMlp, HafaOptions
from ..family import ClusteredStage, Family, subsampled_attention

# Inside the official HAFA's LAA (patch_embed2, patch_embed3: DeformablePatchMerging): the deformable conv
# is mmcv's DeformConv2dPack `dconv`, which keeps its offset predictor as `conv_offset`, and the BatchNorm
# is `norm_layer`. Renamed in this order.
OFFICIAL_LAA_NAMES = {"dconv.conv_offset.": "offset.", "dconv.": "proj.", "norm_layer.": "norm."}
# Inside the official HAFA's SIA (patch_embed4: CTM): the token conv `conv` (a 3x3/s2 conv with its `skip`),
# the keys/values path `Multiscale` (`skip`, `depth_conv`, `point_conv`) and its LayerNorm `norm1`.
# Renamed in this order; CTM's score bias and unused `proj_q` have no counterpart and are reported unused.
OFFICIAL_SIA_NAMES = {
    "conv.skip.": "skip.",
    "conv.": "proj.",
    "Multiscale.skip.": "kv_proj.",
    "Multiscale.depth_conv.": "kv_dwconv.",
    "Multiscale.point_conv.": "kv_pwconv.",
    "norm1.": "kv_norm.",
}


def staged_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official PVT v1 / v2 and HAFA names (patch_embed1..4, pos_embed1..4, block1..4, norm1..4,
    cls_token) as the staged ones of timm's PVT v2 and our PVT v1; any other checkpoint as it is."""
    if not any(k.startswith(("patch_embed1.", "block1.")) for k in state_dict):
        return state_dict
    v1 = any(k.startswith("pos_embed1") for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        k = k.replace("dwconv.dwconv", "dwconv")
        k = re.sub(r"^block(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.", k)
        k = re.sub(r"^norm(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm.", k)
        k = re.sub(r"^pos_embed(\d)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed", k)
        if v1:
            k = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed.", k)
            k = "stages.3.cls_token" if k == "cls_token" else k
        else:
            k = k.replace("patch_embed1.", "patch_embed.")
            k = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample.", k)
        for official, ours in OFFICIAL_LAA_NAMES.items():
            k = re.sub(rf"^(stages\.[12]\.(?:patch_embed|downsample)\.){re.escape(official)}", rf"\g<1>{ours}", k)
        for official, ours in OFFICIAL_SIA_NAMES.items():
            k = re.sub(rf"^(stages\.3\.(?:patch_embed|downsample)\.){re.escape(official)}", rf"\g<1>{ours}", k)
        out[k] = v
    return out


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
    model_names = tuple(timm.list_models(module="pvt_v2"))
    baseline_weights = {
        f"pvt_v2_{b}": dict(hf_hub_id=f"timm/pvt_v2_{b}.in1k") for b in ("b0", "b1", "b2", "b3", "b4", "b5", "b2_li")
    }

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.patch_embed(images)  # NHWC, as the first stage takes it

    def attention_stages(self, model: nn.Module) -> set[int]:
        return {0, 1, 2, 3}

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        stage = model.stages[index]
        stage.downsample = LAA.from_downsample(stage.downsample.proj, stage.downsample.norm, laa_norm)

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        stage = model.stages[index]
        proj = stage.downsample.proj
        with torch.device(proj.weight.device):
            sia = SIA(
                in_dim=proj.in_channels,
                out_dim=proj.out_channels,
                proj=proj,
                norm=stage.downsample.norm,
                options=options,
            )
        blocks = nn.ModuleList(clustered_block(block) for block in stage.blocks)
        model.stages[index] = ClusteredStage(sia=sia, blocks=blocks, norm=stage.norm)

    def checkpoint_names(self, state_dict: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return staged_names(state_dict)


FAMILY = PvtV2()
