"""EdgeNeXt (timm's EdgeNeXt) as a HAFA family.

Its transitions are ConvNeXt's: `stages.{1,2,3}.downsample`, an unnamed nn.Sequential, a LayerNorm2d
(`0`) before a 2x2/s2 conv (`1`), NCHW in and out; the LAA form replaces child `1` by
hafa.layers.DeformableConv2d (timm's names kept, the offset predictor `downsample.1.offset`), the norm
before it stays. Stages take and give NCHW maps (the Fourier position encoding of the SDTA blocks is
made for each map's size, so any input size goes); the final `norm_pre` (a norm only with
head_norm_first) closes forward_features, the head (pooling, norm, MLP) runs on the last map.

No stage takes SIA. The SDTA blocks' attention is transposed (cross-covariance, XCA): each head mixes
channels with a C x C map and every token keeps its own position, so no token attends to another and
merged tokens would have no grid for the blocks' depthwise convs (Res2Net-like split convs before the
attention, ConvBlocks around it): "sia" is refused as for a convolution stage. edgenext_small_rw
(downsample_block=True) has no transition layers: it downsamples inside each stage's first block with a
strided depthwise conv, which LAA does not deform (groups), so its LAA conversion is refused and it is
not registered.
"""

import timm
from timm.models.edgenext import EdgeNeXt
from torch import nn

from .convnext import ConvNeXtFamily


class EdgeNeXtFamily(ConvNeXtFamily):
    name = "edgenext"
    model_classes = (EdgeNeXt,)
    # edgenext_small_rw downsamples inside its blocks (a strided depthwise conv): LAA refused, not registered
    model_names = tuple(name for name in timm.list_models(module="edgenext") if name != "edgenext_small_rw")

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        if isinstance(model.stages[index].downsample, nn.Identity):
            raise ValueError(
                f"edgenext's stages.{index}.downsample is Identity: the model was built with downsample_block=True "
                "(edgenext_small_rw) and downsamples in its first block's strided depthwise conv, which LAA does not "
                "deform (groups); keep this transition 'conv'"
            )
        super().convert_laa(model, index, laa_norm)

    def drop_head(self, model: nn.Module) -> None:
        # as timm's prune: a NormMlpClassifierHead's norm is sized for the last stage
        model.base_class.reset_classifier(model, 0, "", reset_other=True)


FAMILY = EdgeNeXtFamily()
