"""MambaOut (timm's MambaOut) as a HAFA family.

Transitions `stages.{1,2,3}.downsample`: a 3x3/s2/p1 conv `conv` and a LayerNorm `norm`, after the conv
(Downsample, the paper's models) or before it (DownsampleNormFirst, the `_rw` models), NHWC in and out.
The LAA form replaces only the conv (hafa.layers.DeformableConv2d, keeping timm's names; the offset
predictor is `downsample.conv.offset`). A norm before the conv stays; a norm after it stays with
laa_norm="baseline" and gives way to LAA's BatchNorm and GELU with "batch". Stages take and give NHWC
maps; the head (pooling, norm, MLP) runs on the last one. No stage attends (gated depthwise-conv
blocks), so SIA starts none.
"""

import timm
from timm.models.mambaout import Downsample, DownsampleNormFirst, MambaOut
from torch import Tensor, nn

from ...layers import DeformableConv2d
from ..family import ChannelsLastFamily


class MambaOutFamily(ChannelsLastFamily):
    name = "mambaout"
    model_names = tuple(timm.list_models(module="mambaout"))
    model_classes = (MambaOut,)

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.stem(images)  # NHWC, as the stages take it

    def attention_stages(self, model: nn.Module) -> set[int]:
        return set()

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        path = f"stages.{index}.downsample"
        transition = model.stages[index].downsample
        if not isinstance(transition, (Downsample, DownsampleNormFirst)):
            raise ValueError(
                f"mambaout's {path} is {type(transition).__name__}, no downsampling conv for LAA (the model was "
                "built with downsample=''); keep it 'conv'"
            )
        try:
            transition.conv = DeformableConv2d.from_conv(transition.conv, laa_norm)
        except ValueError as error:
            raise ValueError(f"mambaout's {path}: {error}") from error
        if laa_norm == "batch" and isinstance(transition, Downsample):
            transition.norm = nn.Identity()  # LAA's BatchNorm and GELU in place of the norm after the conv

    def drop_head(self, model: nn.Module) -> None:
        # as timm's prune: the MLP head's norm and MLP are sized for the last stage
        model.base_class.reset_classifier(model, 0, "", reset_other=True)


FAMILY = MambaOutFamily()
