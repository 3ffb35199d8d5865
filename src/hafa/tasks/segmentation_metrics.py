"""Segmentation inference (whole image or sliding window) and metrics from a confusion matrix:
mIoU, mean class accuracy, pixel accuracy and per-class IoU, all in percent as mmseg reports them."""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.segmentation import IGNORE_INDEX, SegmentationDataset, collate_segmentation
from ..errors import UserError
from .processes import ProcessContext, all_sum
from .run_log import progress_bar
from .sampling import evaluation_loader
from .training import autocast_context


def confusion_matrix(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """predicted, labels: [...] class ids (labels may hold IGNORE_INDEX) -> [K, K] int64 counts,
    rows = true class, columns = predicted class."""
    valid = labels != IGNORE_INDEX
    pairs = labels[valid] * num_classes + predicted[valid]
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(matrix: Tensor, class_names: Sequence[str]) -> dict[str, object]:
    """-> mIoU, mAcc, aAcc (pixel accuracy) in %, and IoU per class (NaN for a class that is neither in
    the ground truth nor predicted; such classes are left out of the means, as mmseg does)."""
    matrix = matrix.double()
    hits, truth, predicted = matrix.diag(), matrix.sum(1), matrix.sum(0)
    iou = hits / (truth + predicted - hits)
    accuracy = hits / truth
    total = matrix.sum()
    return dict(
        mIoU=100 * float(iou.nanmean()),
        mAcc=100 * float(accuracy.nanmean()),
        aAcc=100 * float(hits.sum() / total) if total > 0 else math.nan,
        per_class_IoU={name: 100 * float(v) for name, v in zip(class_names, iou)},
    )


@torch.no_grad()
def infer_logits(
    model: nn.Module,
    image: Tensor,
    mode: str = "whole",
    crop: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
) -> Tensor:
    """image [1, 3, h, w] -> logits [1, K, h, w]: the whole image at once, or windows of `crop` every
    `stride` pixels (the last ones flush with the border) whose logits are averaged where they overlap."""
    if mode == "whole":
        return model(image)
    if mode != "slide":
        raise UserError(f"unknown inference mode {mode!r}: 'whole' or 'slide'")
    height, width = image.shape[-2:]
    total, counts = None, image.new_zeros(1, 1, height, width)
    rows = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride[0] + crop[0], height), min(col * stride[1] + crop[1], width)
            top, left = max(bottom - crop[0], 0), max(right - crop[1], 0)
            logits = model(image[..., top:bottom, left:right]).float()
            if total is None:
                total = image.new_zeros(1, logits.shape[1], height, width, dtype=torch.float32)
            total[..., top:bottom, left:right] += logits
            counts[..., top:bottom, left:right] += 1
    return total / counts


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: SegmentationDataset,
    class_names: list[str],
    processes: ProcessContext,
    workers: int = 0,
    amp: str = "none",
    mode: str = "whole",
    crop: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    desc: str = "eval",
) -> dict:
    """Metrics over the dataset (one image at a time, shared among the processes): the logits of the
    resized image are resized back to the original size and compared there."""
    model.eval()
    num_classes = len(class_names)
    loader = evaluation_loader(dataset, 1, workers, processes, collate_segmentation)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    images, skipped, not_finite = 0, 0, 0
    for batch in progress_bar(loader, processes, desc=desc, leave=False):
        batch.check()
        skipped += batch.skipped
        if batch.images is None:
            continue
        with autocast_context(amp, processes.device):
            logits = infer_logits(model, batch.images.to(processes.device), mode, crop, stride)
        logits = F.interpolate(logits.float(), size=batch.labels.shape[-2:], mode="bilinear", align_corners=False)
        matrix += confusion_matrix(logits.argmax(1), batch.labels.to(processes.device), num_classes)
        not_finite += int(not torch.isfinite(logits).all())  # the matrix is read on the host anyway
        images += 1
    summed = all_sum(matrix.flatten().tolist() + [images, skipped, not_finite], processes)
    images, skipped, not_finite = int(summed[-3]), int(summed[-2]), int(summed[-1])
    if images == 0:
        raise UserError("no readable validation images")
    if not_finite:
        raise UserError(
            f"the model's logits are not finite (NaN or infinity) for {not_finite} of the {images} images: "
            "no mIoU is reported from them" + (" (try --amp none)" if amp != "none" else "")
        )
    matrix = torch.tensor(summed[:-3], dtype=torch.float64).reshape(num_classes, num_classes)
    if matrix.sum() == 0:
        raise UserError(
            f"no pixel of the {images} evaluated masks is labelled (every value is ignore): mIoU is undefined; "
            "check the masks and --reduce-zero-label"
        )
    return dict(segmentation_metrics(matrix, class_names), images=images, skipped=skipped)
