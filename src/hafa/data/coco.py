"""COCO instance annotations for Mask R-CNN, read through pycocotools:
    ROOT/annotations/instances_<split>.json   (images, annotations, categories)
    ROOT/<split>/<file_name>                  (COCO 2017: split train2017 / val2017)

Every field of the annotation file is checked whenever it is read (`instances_problems`; cheap next to
parsing the json), so that neither training nor COCOeval ever sees a broken annotation. Refused, with
messages naming the file, the ids and what is wrong (up to ten problems at once): invalid JSON, missing
keys, ids that are not whole numbers, duplicate ids, annotations of image ids that are not listed,
category ids that are not in the categories, no categories, no annotations, images without a size in
whole pixels, file names that lead out of the split's folder ('..', absolute paths), bboxes that are
not four finite numbers [x, y, width, height] or have a negative size, NaN or infinite coordinates,
polygons of fewer than three points or with points farther outside their image than its own size,
empty segmentations, RLE of another size than its image or whose runs (compressed ones decoded) do not
add up to it, non-finite areas, iscrowd other than 0 / 1. A missing 'area' is computed from the
mask (COCOeval needs it). data/checks.py adds the image files (present, readable, of the listed size).

Training targets (what the loader of the training split returns):
- crowd annotations (iscrowd=1) are left out (torchvision's Mask R-CNN has no ignore regions;
  COCOeval ignores them in evaluation);
- boxes are clipped to the image (counted); degenerate boxes (width or height <= 1 pixel inside the
  image) and empty masks (zero area) are dropped and counted (`dropped`, reported by the task);
- images left without objects are skipped by default (filter_empty, as mmdetection's training
  does); with filter_empty=False they stay in as pure negatives.
Evaluation uses every listed image against the file itself (COCOeval). Unreadable image files are
skipped with a warning and counted (data/files.py): in training the next readable image takes their
place, in evaluation they are left out.

Augmentation (training): horizontal flip of the image, its boxes and its masks, seeded per
(seed, epoch, index) so that a sample looks the same in any process or worker and after a resume.
"""

import contextlib
import io
import json
import logging
import math
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
from .files import first_readable, many_problems, read_rgb
from .folder import sample_seed

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


def first_items(values, limit: int = 10) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values[:limit]) + (f" ... ({len(values)} in all)" if len(values) > limit else "")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole_number(value) -> bool:
    return _is_number(value) and math.isfinite(value) and value == int(value)


def _finite_numbers(values) -> bool:
    """True for a list of numbers, none NaN or infinite. One sum over the list (C speed, for the millions
    of COCO coordinates): anything but a number makes it raise, NaN or infinity makes it non-finite (as
    would an overflow of finite values, which needs coordinates beyond 1e300)."""
    if not isinstance(values, list):
        return False
    try:
        return math.isfinite(sum(values))
    except TypeError:
        return False


def compressed_runs(counts: str) -> list[int] | None:
    """The runs of a compressed RLE (COCO's `counts` string), decoded, or None where the text is not one.

    The format (pycocotools' rleToString): each run is a variable-length number, 5 bits per character
    (the character's code minus 48), low bits first; a sixth bit (32) says that another character
    follows; the last character's bit 16 extends the sign; from the third run on, a run is stored as
    its difference from the run two before. pycocotools decodes any text without checking it (a
    damaged one writes past its mask or leaves pixels unset), so the runs are read here first."""
    runs, value, shift = [], 0, 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    return None if shift else runs  # a run left unfinished: cut short


# How far beyond its image a polygon point may lie, in image sizes: pycocotools rasterises every edge
# point by point, so a coordinate of 1e7 takes seconds and one of 1e9 crashes it.
POLYGON_REACH = 1


def _polygon_problem(polygons: list, height, width) -> str | None:
    """What is wrong with polygons of an image of this size, or None."""
    if not all(_finite_numbers(p) for p in polygons):
        return "polygon coordinates must be finite numbers (NaN, infinity or a non-number found)"
    if not all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons):
        return "a polygon needs at least 3 points (an even count of 6 or more numbers); fix or drop it"
    if is_whole_number(height) and is_whole_number(width):
        for polygon in polygons:
            for values, side in ((polygon[0::2], width), (polygon[1::2], height)):
                if min(values) < -POLYGON_REACH * side or max(values) > (1 + POLYGON_REACH) * side:
                    return (
                        "polygon points lie farther outside the image than its own width or height (coordinates "
                        "of another image, or in another unit?); fix or drop them"
                    )
    return None


def _mask_problem(segmentation, height, width) -> str | None:
    """What is wrong with a segmentation (polygons or RLE) of an image of this size, or None."""
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, (str, list))):
            return "segmentation must be polygons or RLE ({'size': [height, width], 'counts': ...})"
        if size != [height, width]:
            return "RLE size differs from the image's [height, width]; the RLE belongs to another image"
        if isinstance(counts, list) and not (
            all(is_whole_number(c) and c >= 0 for c in counts) and sum(counts) == size[0] * size[1]
        ):
            return "RLE counts must be whole numbers >= 0 adding up to height * width"
        if isinstance(counts, str):
            runs = compressed_runs(counts)
            if runs is None or min(runs, default=0) < 0 or sum(runs) != size[0] * size[1]:
                return (
                    "compressed RLE counts do not decode to runs >= 0 adding up to height * width (a damaged "
                    "or cut string)"
                )
        return None
    if not isinstance(segmentation, list) or not all(isinstance(p, list) for p in segmentation):
        return "segmentation must be polygons or RLE (a list of [x1, y1, x2, y2, ...] lists, or {'size', 'counts'})"
    if not segmentation:
        return "segmentation is empty: Mask R-CNN needs a mask per object (give a polygon, or drop the annotation)"
    return _polygon_problem(segmentation, height, width)


def outside_the_folder(file_name: str) -> bool:
    """Whether an image's file_name leads out of its split's folder: an absolute path, or a '..' part."""
    parts = file_name.replace(os.altsep or os.sep, os.sep).split(os.sep)
    return os.path.isabs(file_name) or ".." in parts


def _box_problem(box) -> str | None:
    """What is wrong with a bbox, or None."""
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        return "bbox must be [x, y, width, height], four numbers"
    if not _finite_numbers(box):
        return "bbox holds NaN or infinity"
    if box[2] < 0 or box[3] < 0:
        return "bbox has a negative width or height (COCO boxes are [x, y, width, height], not corners)"
    return None


def _entry_problems(path: str, content: dict) -> list[str]:
    """Entries that are not objects with the required keys, and duplicate ids."""
    problems = []
    for section, keys in REQUIRED_KEYS.items():
        for key in keys:
            lacking = [i for i, entry in enumerate(content[section]) if not isinstance(entry, dict) or key not in entry]
            if lacking:
                problems.append(f"{path}: {len(lacking)} {section} lack '{key}' (entries {first_items(lacking)})")
        for key in ("id", "image_id", "category_id") if section == "annotations" else ("id",):
            not_whole = [
                e[key] for e in content[section] if isinstance(e, dict) and key in e and not is_whole_number(e[key])
            ]
            if not_whole:
                problems.append(
                    f"{path}: {section} {key}s must be whole numbers, not {first_items(map(repr, not_whole))}"
                )
        ids = [entry.get("id") for entry in content[section] if isinstance(entry, dict)]
        duplicates = [i for i, n in Counter(i for i in ids if is_whole_number(i)).items() if n > 1]
        if duplicates:
            problems.append(f"{path}: duplicate {section} ids: {first_items(duplicates)}")
    return problems


def instances_problems(path: str, content) -> list[str]:
    """Every problem of the content of an instances json, each naming the file, the ids and what to do."""
    if not isinstance(content, dict):
        return [f"{path}: expected a JSON object with images, annotations and categories"]
    missing = [key for key in REQUIRED_KEYS if not isinstance(content.get(key), list)]
    if missing:
        return [f"{path} has no list of {', '.join(missing)}"]
    problems = _entry_problems(path, content)
    if problems:
        return problems
    images = {image["id"]: image for image in content["images"]}
    bad_images = [
        i
        for i, image in images.items()
        if not (
            is_whole_number(image["height"])
            and is_whole_number(image["width"])
            and image["height"] > 0
            and image["width"] > 0
        )
        or not (isinstance(image["file_name"], str) and image["file_name"])
    ]
    if bad_images:
        problems.append(
            f"{path}: images {first_items(bad_images)} need a file_name and a height and width in whole pixels > 0"
        )
    outside = [
        i
        for i, image in images.items()
        if isinstance(image["file_name"], str) and outside_the_folder(image["file_name"])
    ]
    if outside:
        problems.append(
            f"{path}: images {first_items(outside)}: file_name must be a path inside the split's folder, without "
            f"'..' or a leading '/' (first: {images[outside[0]]['file_name']!r})"
        )
    category_ids = {category["id"] for category in content["categories"]}
    if not category_ids:
        problems.append(f"{path}: no categories")
    unnamed = [c["id"] for c in content["categories"] if not (isinstance(c["name"], str) and c["name"])]
    if unnamed:
        problems.append(f"{path}: categories {first_items(unnamed)} need a name (a non-empty string)")
    annotations = content["annotations"]
    if not annotations:
        problems.append(f"{path}: no annotations (nothing to train on or to evaluate against)")
    unknown_images = {a["image_id"] for a in annotations} - set(images)
    if unknown_images:
        problems.append(
            f"{path}: annotations refer to image ids that are not in its images: {first_items(sorted(unknown_images))}"
        )
    unknown_categories = {a["category_id"] for a in annotations} - category_ids
    if unknown_categories:
        problems.append(
            f"{path}: annotations use category ids that are not in its categories "
            f"({first_items(sorted(category_ids))}): {first_items(sorted(unknown_categories))}"
        )
    by_problem = defaultdict(list)
    for annotation in annotations:
        image = images.get(annotation["image_id"], {})
        found = [
            _box_problem(annotation["bbox"]),
            _mask_problem(annotation["segmentation"], image.get("height"), image.get("width")),
        ]
        area = annotation.get("area", 0)
        if not (_is_number(area) and math.isfinite(area) and area >= 0):
            found.append("area must be a finite number >= 0")
        if annotation.get("iscrowd", 0) not in (0, 1):
            found.append("iscrowd must be 0 or 1")
        for problem in found:
            if problem:
                by_problem[problem].append(annotation["id"])
    problems += [f"{path}: annotations {first_items(ids)}: {problem}" for problem, ids in by_problem.items()]
    return problems


def parse_instances(path: str) -> tuple[dict | None, list[str]]:
    """-> (the content of an instances json or None, the list of its problems)."""
    if not os.path.isfile(path):
        return None, [f"annotation file not found: {path}"]
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, [f"{path} is not valid JSON: {error}"]
    except OSError as error:
        return None, [f"{path} cannot be read: {error}"]
    return content, instances_problems(path, content)


def read_instances(path: str) -> dict:
    """The content of an instances json, checked (see the module docstring); UserError listing its problems."""
    content, problems = parse_instances(path)
    if problems:
        raise many_problems(problems)
    return content


def size_problem(image_path: str, size: tuple[int, int], json_path: str, image: dict) -> str | None:
    """The message for an image file whose size (width, height) is not the one its json entry lists."""
    if size == (image["width"], image["height"]):
        return None
    return (
        f"{image_path} is {size[0]} x {size[1]} pixels, but {json_path} says {image['width']} x {image['height']}; "
        "fix the json's width and height (or the file)"
    )


def find_missing_images(json_path: str, image_dir: str, names: list[str]) -> tuple[set[str], str | None]:
    """-> (the listed file names that are not files in image_dir, a problem naming them or the missing folder)."""
    if not os.path.isdir(image_dir):
        return set(names), f"image folder not found: {image_dir} (the images of {json_path})"
    present = set(os.listdir(image_dir))
    missing = [n for n in names if n not in present and not os.path.isfile(os.path.join(image_dir, n))]
    if not missing:
        return set(), None
    return set(
        missing
    ), f"{len(missing)} images listed in {json_path} are missing from {image_dir}: {first_items(missing)}"


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
    """False for an empty mask (zero area); a checked file has no polygon of fewer than three points."""
    return annotation["area"] > 0


@dataclass
class Dropped:
    """What a training split leaves out or changes: annotation ids of degenerate boxes, of boxes clipped
    to their image and of empty masks, the number of crowd annotations, the ids of images left without
    objects (skipped or kept as negatives)."""

    degenerate_boxes: list[int] = field(default_factory=list)
    clipped_boxes: list[int] = field(default_factory=list)
    empty_masks: list[int] = field(default_factory=list)
    crowd: int = 0
    images_without_objects: list[int] = field(default_factory=list)

    def messages(self, filter_empty: bool) -> list[str]:
        lines = []
        if self.degenerate_boxes:
            lines.append(
                f"dropped {len(self.degenerate_boxes)} degenerate boxes (width or height <= 1 px; "
                f"annotation ids {first_items(self.degenerate_boxes)})"
            )
        if self.clipped_boxes:
            lines.append(
                f"clipped {len(self.clipped_boxes)} boxes that extend beyond their image "
                f"(annotation ids {first_items(self.clipped_boxes)})"
            )
        if self.empty_masks:
            lines.append(
                f"dropped {len(self.empty_masks)} empty masks (annotation ids {first_items(self.empty_masks)})"
            )
        if self.images_without_objects:
            what = "skipped" if filter_empty else "kept as negatives"
            lines.append(
                f"{len(self.images_without_objects)} training images without objects {what} "
                f"(image ids {first_items(self.images_without_objects)})"
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
        names = [image["file_name"] for image in self.coco.dataset["images"]]
        _, problem = find_missing_images(self.path, self.image_dir, names)
        if problem:
            raise UserError(problem)

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
                continue
            if box != [x, y, x + w, y + h]:
                self.dropped.clipped_boxes.append(annotation["id"])
            if not _has_mask(annotation):
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

    def _read(self, image_id: int) -> tuple[torch.Tensor, int] | None:
        """-> (image 3 x H x W in [0, 1], its id), or None when unreadable."""
        image = read_rgb(self.image_path(image_id))
        if image is None:
            return None
        problem = size_problem(self.image_path(image_id), image.size, self.path, self.coco.imgs[image_id])
        if problem:
            raise UserError(problem)
        return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True), image_id

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
        read, skipped = first_readable(
            lambda i: self._read(self.image_ids[i]),
            index,
            len(self.image_ids),
            self.train,
            lambda i: self.image_path(self.image_ids[i]),
        )
        if read is None:
            return None, dict(image_id=self.image_ids[index]), skipped
        image, image_id = read
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
