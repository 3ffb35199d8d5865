"""Classification metrics: loss, top-1 and top-5 accuracy (%) over a dataset shared among the processes."""

import math

import torch
import torch.nn.functional as F
from timm.utils import accuracy
from torch import nn
from torch.utils.data import Dataset

from ..data.folder import collate_skipping
from ..errors import UserError
from .processes import ProcessContext, all_sum
from .run_log import progress_bar
from .sampling import evaluation_loader
from .training import autocast_context


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    workers: int,
    processes: ProcessContext,
    amp: str = "none",
) -> dict:
    """Loss, top-1 and top-5 (%) over the dataset (images [3, H, W], class ids), shared among the
    processes; with the images counted and the unreadable files skipped."""
    model.eval()
    loader = evaluation_loader(dataset, batch_size, workers, processes, collate_skipping)
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, images, skipped files
    for images, targets, skipped in progress_bar(loader, processes, desc="eval", leave=False):
        sums[4] += skipped
        if images is None:
            continue
        images, targets = images.to(processes.device), targets.to(processes.device)
        with autocast_context(amp, processes.device):
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        n = targets.shape[0]
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").item()
        sums[1] += top1.item() * n / 100
        sums[2] += top5.item() * n / 100
        sums[3] += n
    loss, hits1, hits5, count, skipped = all_sum(sums, processes)
    if count == 0:
        raise UserError("no readable validation images")
    if not math.isfinite(loss):
        raise UserError(
            f"the evaluation's loss is {loss / count}: the model's logits are not finite (NaN or infinity) for "
            f"some of the {int(count)} images; no accuracy is reported from them"
            + (" (try --amp none)" if amp != "none" else "")
        )
    return dict(
        loss=loss / count, top1=100 * hits1 / count, top5=100 * hits5 / count, images=int(count), skipped=int(skipped)
    )
