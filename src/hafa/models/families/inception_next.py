"""InceptionNeXt (timm's MetaNeXt) as a HAFA family.

Its transitions are ConvNeXt's: `stages.{1,2,3}.downsample`, an unnamed nn.Sequential, a BatchNorm2d
(`0`) before a 2x2/s2 conv (`1`), NCHW in and out; the LAA form replaces child `1` by
hafa.layers.DeformableConv2d (timm's names kept, the offset predictor `downsample.1.offset`), the norm
before it stays. Stages take and give NCHW maps and no norm follows the last one (the MLP head has its
own), so the Family defaults run them. No stage attends (depthwise inception mixers), so SIA starts
none; a model built with output_stride < 32 has stride-1 dilated transitions, which LAA refuses.
"""

import timm
from timm.models.inception_next import MetaNeXt
from torch import Tensor, nn

from .convnext import ConvNeXtFamily


class InceptionNeXtFamily(ConvNeXtFamily):
    name = "inception_next"
    model_names = tuple(timm.list_models(module="inception_next"))
    final_norm_name = None
    model_classes = (MetaNeXt,)

    def grid_features(self, model: nn.Module, x: Tensor) -> Tensor:
        return x

    def drop_head(self, model: nn.Module) -> None:
        # timm's MLP head keeps its pooling ('' is refused) and drops its MLP, sized for the last stage
        model.base_class.reset_classifier(model, 0, "avg", reset_other=True)


FAMILY = InceptionNeXtFamily()
