"""Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", 2019) on a timm backbone.

The backbone's four maps (strides 4, 8, 16, 32) go through torchvision's FeaturePyramidNetwork
(256 channels; the top-down path upsamples to each map's exact size, so any input size works).
The semantic head brings every level to stride 4 with stages of 3x3 conv (128 channels), GroupNorm,
ReLU and 2x bilinear upsampling (one stage for strides 4 and 8, two for 16, three for 32; the stride-4
level is not upsampled), sums them, and a 1x1 conv (after dropout 0.1) classifies each pixel;
the logits are upsampled bilinearly to the input size. The input is zero-padded at the bottom and
right to a multiple of 4 (the patch size every backbone here starts with), and to at least 32 x 32,
and the logits cropped back.
"""

import timm
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from ..errors import UserError, unknown_name
from .common import SMALLEST_INPUT

PATCH_SIZE = 4


class SemanticHead(nn.Module):
    """FPN maps -> stride-4 logits. Level i (stride 4 * 2^i) takes max(1, i) conv stages."""

    def __init__(self, num_levels: int, in_channels: int, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.ModuleList(
                Conv2dNormActivation(
                    in_channels if stage == 0 else channels, channels, 3, norm_layer=lambda c: nn.GroupNorm(32, c)
                )
                for stage in range(max(1, level))
            )
            for level in range(num_levels)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[Tensor]) -> Tensor:
        """maps: [B, C, H_i, W_i] from stride 4 up -> [B, num_classes, H_0, W_0]."""
        total = 0
        for level, (stages, x) in enumerate(zip(self.levels, maps)):
            for stage, conv in enumerate(stages):
                x = conv(x)
                if level > 0:  # each upsampling doubles towards the next finer map, ending at stride 4's size
                    x = F.interpolate(x, size=maps[level - stage - 1].shape[-2:], mode="bilinear", align_corners=False)
            total = total + x
        return self.classifier(self.dropout(total))


class SemanticFPN(nn.Module):
    """images [B, 3, H, W] -> logits [B, num_classes, H, W], for any H and W."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        fpn_channels: int = 256,
        head_channels: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        self.channels_last = str(getattr(backbone, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
        in_channels = backbone.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels)
        self.head = SemanticHead(len(in_channels), fpn_channels, head_channels, num_classes, dropout)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        padded_height = max(SMALLEST_INPUT, height + -height % PATCH_SIZE)
        padded_width = max(SMALLEST_INPUT, width + -width % PATCH_SIZE)
        padded = F.pad(images, (0, padded_width - width, 0, padded_height - height))
        maps = self.backbone(padded)
        if self.channels_last:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        pyramid = self.fpn({str(i): m for i, m in enumerate(maps)})
        logits = self.head(list(pyramid.values()))
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def create_backbone(name: str, backbone_args: dict) -> nn.Module:
    """timm features_only backbone giving the four maps at strides 4-32 (backbone_args: its timm keywords)."""
    if name not in timm.list_models():
        raise unknown_name("model", name, timm.list_models())
    backbone = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **backbone_args)
    if backbone.feature_info.reduction() != [4, 8, 16, 32]:
        raise UserError(
            f"{name}'s first four maps are at strides {backbone.feature_info.reduction()}; Semantic FPN "
            "here takes the hierarchical transformers whose maps are at strides 4, 8, 16, 32"
        )
    return backbone


def create_semantic_fpn(
    name: str,
    *,
    num_classes: int,
    backbone: dict,
    dropout: float = 0.1,
    fpn_channels: int = 256,
    head_channels: int = 128,
) -> SemanticFPN:
    """Semantic FPN on the timm model `name` (backbone: its timm keywords, e.g. drop_path_rate)."""
    return SemanticFPN(
        backbone=create_backbone(name, backbone),
        num_classes=num_classes,
        fpn_channels=fpn_channels,
        head_channels=head_channels,
        dropout=dropout,
    )
