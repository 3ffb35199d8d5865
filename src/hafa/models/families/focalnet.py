"""FocalNet (timm's FocalNet) as a HAFA family.

Transitions `layers.{1,2,3}.downsample`: Downsample, a strided conv `proj` (2x2/s2, or 3x3/s2/p1 in the
overlapped *_fl3 / *_fl4 models) then a LayerNorm2d `norm`, NCHW in and out. The LAA form replaces the
conv (hafa.layers.DeformableConv2d, keeping timm's names; the offset predictor is
`downsample.proj.offset`); the norm stays with laa_norm="baseline" and gives way to LAA's BatchNorm
and GELU with "batch". Stages (`layers`) take and give NCHW maps; the final `norm` closes
forward_features. Focal modulation aggregates context with depthwise convs and gates, not attention,
so no stage takes SIA.
"""

import timm
from timm.models.focalnet import Downsample, FocalNet
from torch import Tensor, nn

from ...layers import DeformableConv2d
from ..family import Family


class FocalNetFamily(Family):
    name = "focalnet"
    model_names = tuple(timm.list_models(module="focalnet"))
    model_classes = (FocalNet,)
    stages_name = "layers"
    final_norm_name = "norm"

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.stem(images)

    def grid_features(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.norm(x)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return set()

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        path = f"layers.{index}.downsample"
        transition = model.layers[index].downsample
        if not isinstance(transition, Downsample):
            raise ValueError(f"focalnet's {path} is {type(transition).__name__}, no downsampling conv for LAA")
        try:
            transition.proj = DeformableConv2d.from_conv(transition.proj, laa_norm)
        except ValueError as error:
            raise ValueError(f"focalnet's {path}: {error}") from error
        if laa_norm == "batch":
            transition.norm = nn.Identity()  # LAA's BatchNorm and GELU in place of the norm after the conv

    def drop_head(self, model: nn.Module) -> None:
        # as timm's prune: a NormMlpClassifierHead (head_hidden_size) drops its MLP, sized for the last stage
        model.base_class.reset_classifier(model, 0, "", reset_other=True)


FAMILY = FocalNetFamily()
