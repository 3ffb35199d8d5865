"""ConvNeXt (timm's ConvNeXt, v1 and v2) as a HAFA family.

Transitions `stages.{1,2,3}.downsample`: an unnamed nn.Sequential, a LayerNorm2d (`0`) before a 2x2/s2
conv (`1`), NCHW in and out; its LAA form replaces child `1` by hafa.layers.DeformableConv2d, which
keeps the conv's names (`downsample.1.weight`; the offset predictor is `downsample.1.offset`), the
norm before it stays. Stages take and give NCHW maps, so the Family defaults run them; the final
`norm_pre` (a norm only in the *_hnf models) closes forward_features. No stage attends, so SIA starts
none; a model built with output_stride < 32 has stride-1 dilated transitions, which LAA refuses.
"""

import timm
from timm.models.convnext import ConvNeXt
from torch import Tensor, nn

from ...layers import DeformableConv2d
from ..family import Family


def strided_conv(model: nn.Module, index: int, family: str = "convnext") -> nn.Conv2d:
    """The conv of transition `index` (a norm, then the conv: child `1`), where it is a plain strided conv
    LAA can deform; `family` names the model in the refusals (InceptionNeXt's transitions are the same)."""
    path = f"stages.{index}.downsample"
    transition = model.stages[index].downsample
    conv = transition[1] if isinstance(transition, nn.Sequential) else None
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(
            f"{family}'s {path} is {type(transition).__name__}, no downsampling conv for LAA; keep it 'conv'"
        )
    if conv.stride == (1, 1) or type(conv) is not nn.Conv2d:
        raise ValueError(
            f"{family}'s {path} does not downsample with a plain strided conv ({conv}): the model was built with "
            "output_stride < 32, which trades the stride for dilation and 'same' padding, and LAA deforms strided "
            "convs only; keep this transition 'conv'"
        )
    return conv


class ConvNeXtFamily(Family):
    name = "convnext"
    final_norm_name = "norm_pre"
    model_classes = (ConvNeXt,)
    model_names = tuple(timm.list_models(module="convnext"))

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.stem(images)

    def grid_features(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.norm_pre(x)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return set()

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        conv = strided_conv(model, index, self.name)
        try:
            deformable = DeformableConv2d.from_conv(conv, laa_norm)
        except ValueError as error:
            raise ValueError(f"{self.name}'s stages.{index}.downsample: {error}") from error
        model.stages[index].downsample[1] = deformable


FAMILY = ConvNeXtFamily()
