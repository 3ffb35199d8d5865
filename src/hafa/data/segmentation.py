"""Semantic segmentation data: image / mask pairs in two layouts, the training and evaluation transforms.

Layouts (pairs match by file name without extension):
    ADE20K   ROOT/images/{training,validation}/*.jpg and ROOT/annotations/{training,validation}/*.png;
             value 0 is "other" (ignored) and 1..K become classes 0..K-1 (reduce_zero_label).
    folders  --images DIR --masks DIR (and the same for validation); the mask values are the classes
             0..K-1 unless reduce_zero_label is asked for.
Masks hold one class id per pixel (PNG mode L, P, I, I;16 or 1, read as they are: a 16-bit mask is
never scaled); 255 is "ignore" in both layouts. A JPEG mask is refused: its compression turns the edges
between classes into other class ids.

Bad input: an image without a mask (or a mask without an image) is left out with a warning that
counts them and names a few; an unreadable image or mask is skipped with a warning and counted
(in training the next readable pair takes its place); a mask that ignores every pixel is fine (it
adds nothing to the loss or the metrics). A class id outside 0..K-1 (other than ignore), a mask of
another size than its image and a colour mask are errors naming the file: they mean the wrong
--num-classes or --reduce-zero-label, or masks that are not class ids, which no training should
silently paper over. data/checks.py finds them all before training; when the check is skipped,
each sample reports its problem and the task raises it in the main process.
"""

import logging
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import ColorJitter

from ..errors import UserError
from .files import UNREADABLE, first_readable, read_rgb, warn_once
from .folder import IMAGE_EXTENSIONS, _is_image, _seeded, sample_seed

IGNORE_INDEX = 255
ADE20K_SPLITS = {"train": "training", "val": "validation"}
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")
LOSSY_FORMATS = ("JPEG", "MPO")  # PIL names camera JPEGs MPO
_logger = logging.getLogger(__name__)

Pair = tuple[str, str]  # (image path, mask path)


# ---------------------------------------------------------------- finding the pairs


def _by_stem(directory: str, what: str) -> dict:
    if not os.path.isdir(directory):
        raise UserError(f"{what} folder not found: {directory}")
    found = {}
    for name in sorted(os.listdir(directory)):
        if not _is_image(name):
            continue
        stem = os.path.splitext(name)[0]
        if stem in found:
            raise UserError(f"two {what} files named {stem} in {directory}: {os.path.basename(found[stem])} and {name}")
        found[stem] = os.path.join(directory, name)
    return found


def pair_folders(images_dir: str, masks_dir: str) -> list[Pair]:
    """(image, mask) pairs of two folders, matched by name; unmatched files are left out with a warning."""
    images, masks = _by_stem(images_dir, "image"), _by_stem(masks_dir, "mask")
    unmatched = ((set(images) - set(masks), images, "mask"), (set(masks) - set(images), masks, "image"))
    for missing, present, other in unmatched:
        if missing:
            names = ", ".join(os.path.basename(present[s]) for s in sorted(missing)[:5])
            files = "file" if len(missing) == 1 else "files"
            warn_once(
                _logger,
                f"{os.path.dirname(present[next(iter(missing))])}: leaving out {len(missing)} {files} with no "
                f"{other} of the same name ({names}{', ...' if len(missing) > 5 else ''})",
            )
    pairs = [(images[s], masks[s]) for s in sorted(set(images) & set(masks))]
    if not pairs:
        raise UserError(
            f"no image in {images_dir} has a mask of the same name in {masks_dir} "
            f"(images end with {', '.join(IMAGE_EXTENSIONS)})"
        )
    return pairs


def ade20k_pairs(root: str, split: str) -> list[Pair]:
    """Pairs of ROOT/images/<split> and ROOT/annotations/<split>; split 'train' or 'val'."""
    if not os.path.isdir(root):
        raise UserError(f"data directory not found: {root}")
    folder = ADE20K_SPLITS[split]
    images, masks = os.path.join(root, "images", folder), os.path.join(root, "annotations", folder)
    if not os.path.isdir(images) or not os.path.isdir(masks):
        raise UserError(
            f"{root} is not in the ADE20K layout: expected {root}/images/{folder}/*.jpg and "
            f"{root}/annotations/{folder}/*.png"
        )
    return pair_folders(images, masks)


def data_pairs(data: dict, split: str) -> list[Pair]:
    """The pairs of a data description: dict(layout='ade20k', root=...) or dict(layout='folders',
    train=[images, masks], val=[images, masks])."""
    if data["layout"] == "ade20k":
        return ade20k_pairs(data["root"], split)
    return pair_folders(*data[split])


# ---------------------------------------------------------------- reading masks


def mask_file_problem(path: str, mode: str, image_format: str | None) -> str | None:
    """Why a file of this mode and format cannot be a mask, or None."""
    if image_format in LOSSY_FORMATS:
        return (
            f"{path}: a JPEG mask is lossy (its compression changes the class ids along every edge); "
            "save the masks as PNG"
        )
    if mode not in MASK_MODES:
        return f"{path}: a mask must hold one class id per pixel (PNG mode L, P, I, I;16 or 1), not a {mode} image"
    return None


def size_problem(
    mask_path: str, mask_size: tuple[int, int], image_path: str, image_size: tuple[int, int]
) -> str | None:
    """The message for a mask of another size (width, height) than its image, or None."""
    if mask_size == image_size:
        return None
    return (
        f"{mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
        f"{image_size[0]}x{image_size[1]} (width x height)"
    )


def read_mask(path: str) -> np.ndarray | None:
    """The mask's values as an H x W array (palette indices for mode P), or None when unreadable."""
    try:
        with Image.open(path) as mask:
            problem = mask_file_problem(path, mask.mode, mask.format)
            if problem:
                raise UserError(problem)
            return np.array(mask)
    except UNREADABLE as error:
        _logger.warning("skipping unreadable mask %s: %s", path, error)
        return None


class LabelMapping:
    """Mask values -> class ids 0..K-1 and IGNORE_INDEX (ADE20K: 0 -> ignore, v -> v - 1)."""

    def __init__(self, num_classes: int, reduce_zero_label: bool):
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise UserError(f"the number of classes must be 1..{IGNORE_INDEX}, not {num_classes}")
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label

    def ignored(self, values: np.ndarray) -> np.ndarray:
        """Which mask values mean "ignore"."""
        ignored = values == IGNORE_INDEX
        if self.reduce_zero_label:
            ignored |= values == 0
        return ignored

    def _not_classes(self, values: np.ndarray) -> np.ndarray:
        """Which int64 mask values are neither classes nor ignore."""
        labels = values - 1 if self.reduce_zero_label else values
        return ~self.ignored(values) & ((labels < 0) | (labels >= self.num_classes))

    def invalid(self, values: np.ndarray) -> np.ndarray:
        """The distinct mask values that are neither classes nor ignore, sorted."""
        values = values.astype(np.int64)
        return np.unique(values[self._not_classes(values)])

    def problem(self, path: str, invalid: np.ndarray) -> str:
        """The message for a mask holding the values `invalid`."""
        first = 1 if self.reduce_zero_label else 0
        shown = ", ".join(str(v) for v in invalid[:10])
        return (
            f"{path}: mask values {shown} are not classes: with {self.num_classes} classes"
            f"{' and --reduce-zero-label' if self.reduce_zero_label else ''} the values are "
            f"{first}..{first + self.num_classes - 1} ({'0 and ' if self.reduce_zero_label else ''}"
            f"{IGNORE_INDEX} = ignore); check --num-classes and --reduce-zero-label"
        )

    def __call__(self, values: np.ndarray, path: str) -> np.ndarray:
        """-> int64 labels; UserError naming the file and the values that are not classes."""
        values = values.astype(np.int64)
        not_classes = self._not_classes(values)
        if not_classes.any():
            raise UserError(self.problem(path, np.unique(values[not_classes])))
        labels = values - 1 if self.reduce_zero_label else values
        labels[self.ignored(values)] = IGNORE_INDEX
        return labels


# ---------------------------------------------------------------- transforms


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """Keep the aspect ratio and fit in scale = (long side, short side): the long side at most scale's
    long side and the short side at most its short side (mmseg's Resize with keep_ratio)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _resize_pair(image: Tensor, labels: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Bilinear (antialiased) for the image, nearest neighbour for the labels."""
    image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    labels = TF.resize(labels[None], list(size), interpolation=InterpolationMode.NEAREST)[0]
    return image, labels


def _normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), list(mean), list(std))


class TrainTransform:
    """(PIL image, labels H x W) -> (image [3, crop_h, crop_w], labels [crop_h, crop_w] int64): random
    rescale (ratio_range of the base scale), random crop (retried up to 10 times while one class covers
    more than cat_max_ratio of it), horizontal flip, photometric jitter, normalisation, padding to the
    crop size (image 0, labels ignore). Random draws come from torch's generator (seeded per sample)."""

    def __init__(self, recipe: dict):
        self.scale, self.ratio_range = recipe["scale"], recipe["ratio_range"]
        self.crop = tuple(recipe["crop_size"])
        self.cat_max_ratio, self.hflip = recipe["cat_max_ratio"], recipe["hflip"]
        self.jitter = ColorJitter(*recipe["color_jitter"]) if recipe["color_jitter"] else None
        self.mean, self.std = recipe["mean"], recipe["std"]

    def _crop_origin(self, labels: Tensor) -> tuple[int, int]:
        height, width = labels.shape
        crop_h, crop_w = min(self.crop[0], height), min(self.crop[1], width)
        for _ in range(10):
            top = int(torch.randint(height - crop_h + 1, ()))
            left = int(torch.randint(width - crop_w + 1, ()))
            if self.cat_max_ratio >= 1:
                break
            counts = torch.bincount(
                labels[top : top + crop_h, left : left + crop_w].flatten(), minlength=IGNORE_INDEX + 1
            )
            counts = counts[:IGNORE_INDEX]
            if (counts > 0).sum() > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return top, left

    def __call__(self, image: Image.Image, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        image, labels = TF.pil_to_tensor(image), torch.from_numpy(labels)
        ratio = self.ratio_range[0] + float(torch.rand(())) * (self.ratio_range[1] - self.ratio_range[0])
        image, labels = _resize_pair(image, labels, rescale_size(*labels.shape, [s * ratio for s in self.scale]))
        top, left = self._crop_origin(labels)
        image = image[:, top : top + self.crop[0], left : left + self.crop[1]]
        labels = labels[top : top + self.crop[0], left : left + self.crop[1]]
        if float(torch.rand(())) < self.hflip:
            image, labels = image.flip(-1), labels.flip(-1)
        if self.jitter is not None:
            image = self.jitter(image)
        image = _normalize(image, self.mean, self.std)
        pad = [0, 0, self.crop[1] - labels.shape[1], self.crop[0] - labels.shape[0]]
        return TF.pad(image, pad, fill=0.0), TF.pad(labels[None], pad, fill=IGNORE_INDEX)[0]


class EvalTransform:
    """(PIL image, labels H x W) -> (image [3, h, w] resized to fit `scale` (short side 512 in the paper's
    recipe), normalised; labels [H, W] at the original size, where the metrics are computed)."""

    def __init__(self, recipe: dict):
        self.scale, self.mean, self.std = recipe["scale"], recipe["mean"], recipe["std"]

    def image_tensor(self, image: Image.Image) -> Tensor:
        size = rescale_size(image.height, image.width, self.scale)
        pixels = TF.resize(
            TF.pil_to_tensor(image), list(size), interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        return _normalize(pixels, self.mean, self.std)

    def __call__(self, image: Image.Image, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        return self.image_tensor(image), torch.from_numpy(labels)


# ---------------------------------------------------------------- the dataset


class SegmentationSample(NamedTuple):
    image: Tensor | None  # None when unreadable (evaluation)
    labels: Tensor | None
    skipped: int  # unreadable files passed over for this sample
    problem: str | None  # an error to raise in the main process


class SegmentationBatch(NamedTuple):
    images: Tensor | None  # [B, 3, h, w]; None when no sample of the batch was readable
    labels: Tensor | None  # [B, H, W] int64
    skipped: int
    problems: list[str]

    def check(self) -> None:
        if self.problems:
            raise UserError(self.problems[0])


def collate_segmentation(samples: list[SegmentationSample]) -> SegmentationBatch:
    kept = [s for s in samples if s.image is not None]
    problems = [s.problem for s in samples if s.problem]
    skipped = sum(s.skipped for s in samples)
    if not kept or problems:
        return SegmentationBatch(None, None, skipped, problems)
    return SegmentationBatch(torch.stack([s.image for s in kept]), torch.stack([s.labels for s in kept]), skipped, [])


class SegmentationDataset(Dataset):
    """(image, mask) pairs through a transform. item -> SegmentationSample.

    Augmentation is seeded per (seed, epoch, index) as in ImageFolderDataset, so resuming is exact.
    """

    def __init__(
        self,
        pairs: list[Pair],
        transform: Callable,
        labels: LabelMapping,
        replace_unreadable: bool = False,
        seed: int = 0,
    ):
        self.pairs, self.transform, self.labels = pairs, transform, labels
        self.replace_unreadable, self.seed, self.epoch = replace_unreadable, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, pair: Pair) -> tuple[Image.Image, np.ndarray] | None:
        image_path, mask_path = pair
        values = read_mask(mask_path)
        image = read_rgb(image_path) if values is not None else None
        if image is None:
            return None
        problem = size_problem(mask_path, (values.shape[1], values.shape[0]), image_path, image.size)
        if problem:
            raise UserError(problem)
        return image, self.labels(values, mask_path)

    def __getitem__(self, index: int) -> SegmentationSample:
        try:
            read, skipped = first_readable(
                lambda i: self._read(self.pairs[i]),
                index,
                len(self.pairs),
                self.replace_unreadable,
                lambda i: self.pairs[i][0],
            )
        except UserError as error:
            return SegmentationSample(None, None, 0, str(error))
        if read is None:
            return SegmentationSample(None, None, skipped, None)
        with _seeded(sample_seed(self.seed, self.epoch, index)):
            image, labels = self.transform(*read)
        return SegmentationSample(image, labels, skipped, None)
