"""PVT v1 (ours, hafa.models.pvt) as a HAFA family.

Transitions `stages.{1,2,3}.patch_embed`: a 2x2/s2 conv `proj` then a LayerNorm `norm`; its LAA form
keeps both names (hafa.layers.LAA). SIA is the authors' (their CTM): its own 3x3/s2 conv and norm, so
the stage's 2x2 embedding is left out. A model with SIA has no class token (it mean-pools the
normalised merged tokens, as the authors' code) and no position embedding after SIA (paper Sec. 3.1):
SIA's keys/values carry position through their convs. Stages pass tokens with their layout; PVT v1's
blocks already run on tokens with any layout. Checkpoints of the official PVT v1 code (and of the
official HAFA code) load with their names as ours.
"""

import torch
from torch import Tensor, nn

from ...layers import LAA, SIA, HafaOptions
from ...ops import TokenLayout
from ..family import ClusteredStage, Family
from ..pvt import PyramidVisionTransformer
from .pvt_v2 import staged_names

_OFFICIAL_URL = "https://github.com/whai362/PVT/releases/download/v2/{name}.pth"
Native = tuple[Tensor, TokenLayout]  # a stage's tokens (the class token first, in the last stage) and layout


class Pvt(Family):
    name = "pvt"
    final_norm_name = "norm"
    model_classes = (PyramidVisionTransformer,)
    model_names = ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large")
    baseline_weights = {name: dict(url=_OFFICIAL_URL.format(name=name)) for name in model_names}

    def prepare(self, model: nn.Module, stage_aggregation: tuple) -> None:
        if "sia" not in stage_aggregation:
            return
        last = model.stages[-1]
        if last.cls_token is not None:  # no class token with SIA: the model mean-pools (the authors' code)
            last.pos_embed = nn.Parameter(last.pos_embed.detach()[:, 1:])
            last.cls_token = None
            model.global_pool = "avg"

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return images  # the first stage embeds the images itself

    def run_stage(self, model: nn.Module, index: int, x) -> Native:
        if index > 0:
            x = self.to_nchw(model, index - 1, x)
        return model.stages[index](x)

    def to_nchw(self, model: nn.Module, index: int, x: Native) -> Tensor:
        tokens, layout = x
        prefix = getattr(model.stages[index], "num_prefix_tokens", 0)  # a class token (grid stages only)
        return layout.to_map(tokens[:, prefix:])

    def from_nchw(self, model: nn.Module, index: int, feature_map: Tensor) -> Native:
        return feature_map.flatten(2).transpose(1, 2), TokenLayout(feature_map.shape[-2:])

    def tokens_of(self, model: nn.Module, index: int, x: Native) -> Native:
        return x

    def grid_features(self, model: nn.Module, x: Native) -> Tensor:
        return model.norm(x[0])

    def token_features(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return model.norm(tokens)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return {0, 1, 2, 3}

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        stage = model.stages[index]
        stage.patch_embed = LAA.from_downsample(stage.patch_embed.proj, stage.patch_embed.norm, laa_norm)

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        stage = model.stages[index]
        proj = stage.patch_embed.proj
        with torch.device(proj.weight.device):
            sia = SIA(in_dim=proj.in_channels, out_dim=proj.out_channels, options=options)
        model.stages[index] = ClusteredStage(sia=sia, blocks=stage.blocks, transition_name="patch_embed")

    def checkpoint_names(self, state_dict: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return staged_names(state_dict)


FAMILY = Pvt()
