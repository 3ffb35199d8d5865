"""Detection inference over a COCO split and its metrics through pycocotools' COCOeval: AP, AP50,
AP75, APs, APm, APl for boxes (bbox_*) and masks (segm_*), in percent, the columns of the paper's
Table 3. Detections are gathered from every process and scored on the main process."""

import contextlib
import copy
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from ..data.coco import CocoInstances, collate_detection
from ..errors import UserError
from .processes import ProcessContext, broadcast_object, gather_objects
from .run_log import progress_bar
from .sampling import evaluation_loader
from .training import autocast_context

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
MASK_THRESHOLD = 0.5


def detections_to_coco(
    detections: Sequence[dict[str, Tensor]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[dict]:
    """torchvision detections (boxes N x 4 xyxy, labels N in 1..K, scores N, masks N x 1 x H x W
    probabilities) -> COCO results: bbox [x, y, w, h], score, category_id, segmentation (RLE of mask > 0.5)."""
    results = []
    for detection, image_id in zip(detections, image_ids):
        boxes = detection["boxes"].float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        masks = (detection["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        labels, scores = detection["labels"].tolist(), detection["scores"].tolist()
        for box, label, score, rle in zip(boxes.tolist(), labels, scores, rles):
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                dict(
                    image_id=int(image_id), category_id=category_ids[label - 1], bbox=box, score=score, segmentation=rle
                )
            )
    return results


def coco_metrics(coco: COCO, results: list[dict], image_ids: Sequence[int]) -> dict[str, float]:
    """COCOeval of `results` on the images `image_ids` of `coco` -> bbox_AP ... segm_APl in percent
    (NaN where the images hold no object of that size; 0 for all when nothing was detected)."""
    if not coco.getAnnIds(imgIds=list(image_ids)):
        raise UserError("the evaluated images hold no annotated objects: AP is undefined")
    metrics = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in METRICS})
            continue
        mine = [{k: v for k, v in r.items() if iou_type == "segm" or k != "segmentation"} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(coco, coco.loadRes(copy.deepcopy(mine)), iou_type)
            evaluation.params.imgIds = sorted(image_ids)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        for name, value in zip(METRICS, evaluation.stats[:6]):
            metrics[f"{iou_type}_{name}"] = 100 * float(value) if value >= 0 else math.nan
    return metrics


@torch.no_grad()
def evaluate_detection(
    model: nn.Module,
    dataset: CocoInstances,
    batch_size: int,
    workers: int,
    processes: ProcessContext,
    amp: str = "none",
    desc: str = "eval",
) -> dict[str, float]:
    """Detect on every image of the dataset (shared among the processes), gather, COCOeval on the main process.
    -> bbox_* and segm_* metrics, images evaluated and files skipped, the same on every process."""
    model.eval()
    loader = evaluation_loader(dataset, batch_size, workers, processes, collate_detection)
    results, image_ids, skipped = [], [], 0
    for images, targets, skipped_now in progress_bar(loader, processes, desc=desc, leave=False):
        skipped += skipped_now
        if not images:
            continue
        with autocast_context(amp, processes.device):
            detections = model([image.to(processes.device) for image in images])
        ids = [target["image_id"] for target in targets]
        results += detections_to_coco(detections, ids, dataset.category_ids)
        image_ids += ids
    gathered = gather_objects((results, image_ids, skipped), processes)
    metrics = None
    if processes.is_main:
        all_results = [r for part in gathered for r in part[0]]
        all_ids = [i for part in gathered for i in part[1]]
        if not all_ids:
            raise UserError("no readable evaluation images")
        metrics = dict(
            coco_metrics(dataset.coco, all_results, all_ids),
            images=len(all_ids),
            skipped=sum(part[2] for part in gathered),
        )
    return broadcast_object(metrics, processes)
