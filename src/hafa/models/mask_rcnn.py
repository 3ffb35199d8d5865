"""Mask R-CNN (He et al. 2017) on a timm backbone, as in the paper's COCO experiments: torchvision's
MaskRCNN with its FeaturePyramidNetwork and LastLevelMaxPool.

The backbone's four maps (strides 4, 8, 16, 32) go through the FPN (256 channels by default) plus a
stride-64 level made by max pooling. torchvision's GeneralizedRCNNTransform resizes every image
(shorter side min_size, longer side at most max_size), normalises it with the backbone's mean and
std and pads the batch at the bottom and right to a multiple of 32, or, with `size_buckets` on, to one
of a few sizes (`side_buckets`: what a compiled backbone needs, one graph per size). A HAFA backbone is
told where that padding is, so that SIA never picks a padding token as a cluster centre.
"""

import math
from collections import OrderedDict
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from ..errors import UserError, unknown_name
from .convert import HafaModel

STRIDES = [4, 8, 16, 32]
# Padded sides between min_size and max_size (both included) when batches are padded to size buckets.
SIDE_BUCKETS = 3


def side_buckets(min_size: int, max_size: int, multiple: int = 32) -> tuple[int, ...]:
    """The sides a batch is padded to with size buckets: SIDE_BUCKETS steps from min_size to max_size,
    each rounded up to a multiple of 32 (800, 1344: 800, 1088, 1344); a side above the last is padded
    to a multiple of 32 as without buckets."""
    steps = [min_size + (max_size - min_size) * i / (SIDE_BUCKETS - 1) for i in range(SIDE_BUCKETS)]
    return tuple(sorted({multiple * math.ceil(side / multiple) for side in steps}))


def pad_to_buckets(images: Tensor, buckets: Sequence[int]) -> Tensor:
    """B x C x H x W padded at the bottom and right (zeros) to the smallest bucket side >= H and >= W."""
    H, W = images.shape[-2:]
    height, width = (next((b for b in buckets if b >= side), side) for side in (H, W))
    return F.pad(images, (0, width - W, 0, height - H)) if (height, width) != (H, W) else images


def batch_padding_mask(images: Tensor, image_sizes: Sequence[tuple[int, int]]) -> Tensor:
    """B x H x W bool, True outside each image's (height, width) at the top left of the padded batch."""
    B, _, H, W = images.shape
    rows = torch.arange(H, device=images.device).view(1, H, 1)
    cols = torch.arange(W, device=images.device).view(1, 1, W)
    heights = torch.tensor([size[0] for size in image_sizes], device=images.device).view(B, 1, 1)
    widths = torch.tensor([size[1] for size in image_sizes], device=images.device).view(B, 1, 1)
    return (rows >= heights) | (cols >= widths)


class FeaturePyramidBackbone(nn.Module):
    """A timm backbone's four stage maps through an FPN: images B x 3 x H x W -> OrderedDict of
    B x out_channels maps '0'..'3' (strides 4..32) and 'pool' (stride 64), as torchvision's MaskRCNN
    expects (it reads `out_channels`)."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        reductions = [info["reduction"] for info in body.feature_info]
        if reductions != STRIDES:
            raise UserError(
                f"{type(body).__name__} gives maps at strides {reductions}; Mask R-CNN here needs {STRIDES}"
            )
        self.indices = list(range(len(STRIDES)))
        body.prune_intermediate_layers(self.indices, prune_norm=False, prune_head=True)
        self.body = body
        self.knows_padding = isinstance(body, HafaModel)
        self.fpn = FeaturePyramidNetwork(
            [info["num_chs"] for info in body.feature_info], out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, images: Tensor, padding_mask: Tensor | None = None) -> dict[str, Tensor]:
        """images: B x 3 x H x W; padding_mask: B x H x W, True outside the images of a padded batch."""
        extra = {}
        if self.knows_padding and padding_mask is not None:
            extra["padding_mask"] = padding_mask
        maps = self.body.forward_intermediates(
            images, indices=self.indices, norm=True, output_fmt="NCHW", intermediates_only=True, **extra
        )
        return self.fpn(OrderedDict((str(i), fmap) for i, fmap in enumerate(maps)))


class PaddingAwareMaskRCNN(MaskRCNN):
    """torchvision's MaskRCNN whose backbone also receives where the padded batch is padding.

    forward(images: list of 3 x H_i x W_i in [0, 1], targets) -> the loss dict in training, else a list
    of dicts (boxes N x 4 xyxy, labels N, scores N, masks N x 1 x H_i x W_i probabilities).
    size_buckets: pad batches to side_buckets(min_size, max_size) instead of multiples of 32.
    """

    size_buckets = False

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        if self.size_buckets:
            buckets = side_buckets(min(self.transform.min_size), self.transform.max_size)
            batch = ImageList(pad_to_buckets(batch.tensors, buckets), batch.image_sizes)
        padding = batch_padding_mask(batch.tensors, batch.image_sizes) if self.backbone.knows_padding else None
        features = self.backbone(batch.tensors, padding)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)


def create_mask_rcnn(
    name: str, *, num_classes: int, backbone: dict, fpn_channels: int = 256, rcnn: dict | None = None
) -> PaddingAwareMaskRCNN:
    """Mask R-CNN for `num_classes` object classes (torchvision adds the background class 0) on the
    timm model `name` (backbone: its timm keywords); rcnn: torchvision MaskRCNN options (min_size,
    max_size, rpn_*, box_* ...)."""
    if name not in timm.list_models():
        raise unknown_name("model", name, timm.list_models())
    body = timm.create_model(name, **backbone)
    cfg = body.pretrained_cfg
    return PaddingAwareMaskRCNN(
        FeaturePyramidBackbone(body, fpn_channels),
        num_classes=num_classes + 1,
        image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]),
        **(rcnn or {}),
    )
