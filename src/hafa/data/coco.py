"""COCO instance annotations for Mask R-CNN, read through pycocotools:
    ROOT/annotations/instances_<split>.json   (images, annotations, categories)
    ROOT/<split>/<file_name>                  (COCO 2017: split train2017 / val2017)

The annotation file is checked when it is read, with messages naming the file and what is wrong:
invalid JSON, missing keys, duplicate ids, annotations of image ids that are not listed, category ids
that are not in the categories, segmentations that are neither polygons nor RLE, listed images
missing from the folder. A missing 'area' is computed from the mask (COCOeval needs it).

Training targets (what the loader of the training split returns):
- crowd annotations (iscrowd=1) are left out (torchvision's Mask R-CNN has no ignore regions;
  COCOeval ignores them in evaluation);
- degenerate boxes (width or height <= 1 pixel inside the image) and empty masks (no polygon with
  three points, or zero area) are dropped and counted (`dropped`, reported by the task);
- images left without objects are skipped by default (filter_empty, as mmdetection's training
  does); with filter_empty=False they stay in as pure negatives.
Evaluation uses every listed image against the file itself (COCOeval). Unreadable image files are
skipped with a warning and counted, as in data/folder.py: in training the next readable image takes
their place, in evaluation they are left out.

Augmentation (training): horizontal flip of the image, its boxes and its masks, seeded per
(seed, epoch, index) so that a sample looks the same in any process or worker and after a resume.
"""

import contextlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..errors import UserError
from .folder import read_rgb, sample_seed

_logger = logging.getLogger(__name__)

REQUIRED_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox", "segmentation"),
    "categories": ("id", "name"),
}
SPLIT_NAMES = {"train": ("train", "train2017"), "val": ("val", "val2017")}


def annotation_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def find_split(root: str, role: str) -> str:
    """The split name of a role ('train' or 'val') present in ROOT: 'train' / 'train2017', ..."""
    if not os.path.isdir(root):
        raise UserError(f"data directory not found: {root}")
    for split in SPLIT_NAMES[role]:
        if os.path.isfile(annotation_path(root, split)):
            return split
    expected = " or ".join(annotation_path(root, s) for s in SPLIT_NAMES[role])
    raise UserError(f"no {role} annotations in {root}: expected {expected}")


def _first(values, limit: int = 10) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values[:limit]) + (f" ... ({len(values)} in all)" if len(values) > limit else "")


def _check_segmentation(segmentation) -> bool:
    """Polygons (a list of flat [x1, y1, x2, y2, ...] lists) or RLE ({'counts', 'size'})."""
    if isinstance(segmentation, list):
        return all(
            isinstance(p, list) and len(p) % 2 == 0 and all(isinstance(v, (int, float)) for v in p)
            for p in segmentation
        )
    return isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation


def read_instances(path: str) -> dict:
    """The content of an instances json, checked (see the module docstring); UserError naming the problem."""
    if not os.path.isfile(path):
        raise UserError(f"annotation file not found: {path}")
    try:
        with open(path) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise UserError(f"{path}: expected a JSON object with images, annotations and categories")
    missing = [key for key in REQUIRED_KEYS if not isinstance(content.get(key), list)]
    if missing:
        raise UserError(f"{path} has no list of {', '.join(missing)}")
    for section, keys in REQUIRED_KEYS.items():
        for key in keys:
            lacking = [i for i, entry in enumerate(content[section]) if not isinstance(entry, dict) or key not in entry]
            if lacking:
                raise UserError(f"{path}: {len(lacking)} {section} lack '{key}' (entries {_first(lacking)})")
        duplicates = [i for i, n in Counter(entry["id"] for entry in content[section]).items() if n > 1]
        if duplicates:
            raise UserError(f"{path}: duplicate {section} ids: {_first(duplicates)}")
    image_ids = {image["id"] for image in content["images"]}
    category_ids = {category["id"] for category in content["categories"]}
    annotations = content["annotations"]
    unknown_images = {a["image_id"] for a in annotations} - image_ids
    if unknown_images:
        raise UserError(
            f"{path}: annotations refer to image ids that are not in its images: {_first(sorted(unknown_images))}"
        )
    unknown_categories = {a["category_id"] for a in annotations} - category_ids
    if unknown_categories:
        raise UserError(
            f"{path}: annotations use category ids that are not in its categories "
            f"({_first(sorted(category_ids))}): {_first(sorted(unknown_categories))}"
        )
    bad_boxes = [a["id"] for a in annotations if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4)]
    if bad_boxes:
        raise UserError(f"{path}: bbox must be [x, y, width, height]; not so in annotations {_first(bad_boxes)}")
    bad_masks = [a["id"] for a in annotations if not _check_segmentation(a["segmentation"])]
    if bad_masks:
        raise UserError(f"{path}: segmentation must be polygons or RLE; not so in annotations {_first(bad_masks)}")
    return content


def load_coco(path: str) -> COCO:
    """A pycocotools COCO index of a checked instances json (quietly; missing areas computed from the masks)."""
    coco = COCO()
    coco.dataset = read_instances(path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    without_area = [a for a in coco.dataset["annotations"] if "area" not in a]
    for annotation in without_area:
        annotation["area"] = float(mask_utils.area(coco.annToRLE(annotation)))
    if without_area:
        _logger.info("%s: %d annotations without 'area': computed from their masks", path, len(without_area))
    return coco


def _has_mask(annotation: dict) -> bool:
    """False for an empty mask: no polygon of three points or more, or zero area."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list) and not any(len(polygon) >= 6 for polygon in segmentation):
        return False
    return annotation["area"] > 0


@dataclass
class Dropped:
    """What a training split leaves out: annotation ids of degenerate boxes and empty masks, the
    number of crowd annotations, the ids of images left without objects (skipped or kept as negatives)."""

    degenerate_boxes: list[int] = field(default_factory=list)
    empty_masks: list[int] = field(default_factory=list)
    crowd: int = 0
    images_without_objects: list[int] = field(default_factory=list)

    def messages(self, filter_empty: bool) -> list[str]:
        lines = []
        if self.degenerate_boxes:
            lines.append(
                f"dropped {len(self.degenerate_boxes)} degenerate boxes (width or height <= 1 px; "
                f"annotation ids {_first(self.degenerate_boxes)})"
            )
        if self.empty_masks:
            lines.append(f"dropped {len(self.empty_masks)} empty masks (annotation ids {_first(self.empty_masks)})")
        if self.images_without_objects:
            what = "skipped" if filter_empty else "kept as negatives"
            lines.append(
                f"{len(self.images_without_objects)} training images without objects {what} "
                f"(image ids {_first(self.images_without_objects)})"
            )
        return lines


class CocoInstances(Dataset):
    """One split. item -> (image 3 x H x W float in [0, 1] or None, target, files skipped for it).

    Training target: boxes N x 4 (x1, y1, x2, y2 in pixels), labels N (1..K, 0 is background),
    masks N x H x W uint8, image_id. Evaluation target: image_id only (COCOeval reads the file).
    Labels number the categories in the order of their ids; `category_ids[label - 1]` maps back.
    """

    def __init__(
        self,
        root: str,
        split: str,
        train: bool,
        hflip: float = 0.5,
        filter_empty: bool = True,
        categories: Sequence[tuple[int, str]] | None = None,
        seed: int = 0,
    ):
        self.path = annotation_path(root, split)
        self.image_dir = os.path.join(root, split)
        self.coco = load_coco(self.path)
        found = sorted((c["id"], c["name"]) for c in self.coco.dataset["categories"])
        if categories is not None and [tuple(c) for c in categories] != found:
            raise UserError(
                f"the categories of {self.path} differ from the training categories: "
                f"{sorted(set(found) ^ {tuple(c) for c in categories})[:10]} are not in both"
            )
        self.categories = found
        self.category_ids = [category_id for category_id, _ in found]
        self.class_names = [name for _, name in found]
        self._label = {category_id: i + 1 for i, category_id in enumerate(self.category_ids)}
        self.train, self.hflip, self.filter_empty, self.seed, self.epoch = train, hflip, filter_empty, seed, 0
        self._check_files()
        self.dropped = Dropped()
        self.objects = self._training_objects() if train else {}
        image_ids = sorted(self.coco.imgs)
        if train and filter_empty:
            image_ids = [i for i in image_ids if self.objects[i]]
        if not image_ids:
            raise UserError(f"{self.path}: no images" + (" with objects to train on" if train else ""))
        self.image_ids = image_ids

    def _check_files(self) -> None:
        if not os.path.isdir(self.image_dir):
            raise UserError(f"image folder not found: {self.image_dir} (the images of {self.path})")
        present = set(os.listdir(self.image_dir))
        names = [image["file_name"] for image in self.coco.dataset["images"]]
        missing = [n for n in names if n not in present and not os.path.isfile(os.path.join(self.image_dir, n))]
        if missing:
            raise UserError(
                f"{len(missing)} images listed in {self.path} are missing from {self.image_dir}: {_first(missing)}"
            )

    def _training_objects(self) -> dict[int, list[dict]]:
        """image id -> its usable annotations (boxes clipped to the image, as x1, y1, x2, y2)."""
        objects = defaultdict(list)
        for annotation in self.coco.dataset["annotations"]:
            if annotation.get("iscrowd", 0):
                self.dropped.crowd += 1
                continue
            image = self.coco.imgs[annotation["image_id"]]
            x, y, w, h = annotation["bbox"]
            box = [max(0.0, x), max(0.0, y), min(float(image["width"]), x + w), min(float(image["height"]), y + h)]
            if box[2] - box[0] <= 1 or box[3] - box[1] <= 1:
                self.dropped.degenerate_boxes.append(annotation["id"])
            elif not _has_mask(annotation):
                self.dropped.empty_masks.append(annotation["id"])
            else:
                objects[annotation["image_id"]].append(dict(annotation, box=box))
        self.dropped.images_without_objects = [i for i in sorted(self.coco.imgs) if not objects[i]]
        return objects

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])

    def _read(self, image_id: int) -> torch.Tensor | None:
        image = read_rgb(self.image_path(image_id))
        if image is None:
            return None
        info = self.coco.imgs[image_id]
        if image.size != (info["width"], info["height"]):
            raise UserError(
                f"{self.image_path(image_id)} is {image.size[0]} x {image.size[1]} pixels, but {self.path} "
                f"says {info['width']} x {info['height']}"
            )
        return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)

    def _target(self, image_id: int, height: int, width: int, flip: bool) -> dict:
        objects = self.objects[image_id]
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor([o["box"] for o in objects], dtype=torch.float32).view(-1, 4),
            format="XYXY",
            canvas_size=(height, width),
        )
        masks = tv_tensors.Mask(
            np.stack([self.coco.annToMask(o) for o in objects])
            if objects
            else torch.zeros(0, height, width, dtype=torch.uint8)
        )
        if flip:
            boxes, masks = TF.horizontal_flip(boxes), TF.horizontal_flip(masks)
        labels = torch.tensor([self._label[o["category_id"]] for o in objects], dtype=torch.int64)
        return dict(
            boxes=boxes.as_subclass(torch.Tensor),
            labels=labels,
            masks=masks.as_subclass(torch.Tensor),
            image_id=image_id,
        )

    def __getitem__(self, index: int):
        skipped = 0
        for attempt in range(min(len(self.image_ids), 16) if self.train else 1):
            image_id = self.image_ids[(index + attempt) % len(self.image_ids)]
            image = self._read(image_id)
            if image is not None:
                break
            skipped += 1
        else:
            if self.train:
                raise UserError(
                    f"{skipped} images in a row cannot be read, starting at {self.image_path(self.image_ids[index])}"
                )
            return None, dict(image_id=self.image_ids[index]), skipped
        if not self.train:
            return image, dict(image_id=image_id), skipped
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        flip = bool(torch.rand((), generator=generator) < self.hflip)
        target = self._target(image_id, *image.shape[-2:], flip)
        return (TF.horizontal_flip(image) if flip else image), target, skipped


def collate_detection(batch):
    """-> (list of images, list of targets, number of files skipped), leaving out unreadable images."""
    kept = [item for item in batch if item[0] is not None]
    return [item[0] for item in kept], [item[1] for item in kept], sum(item[2] for item in batch)
