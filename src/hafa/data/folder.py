"""Image classification data in the standard folder layout: ROOT/{train,val}/<class>/<image>.

Checked up front so that a wrong path, an empty split or a class folder without images gets a
message naming it (data/checks.py reads every file's header before training). Images are read as
8-bit RGB by data/files.py (grayscale, RGBA, palette and 16/32-bit images work). An unreadable or
truncated image is skipped with a warning naming the file and counted: in training its place in the
batch goes to the next readable image (so that batches keep their size in every process), in
evaluation it is left out.
"""

import hashlib
import os
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .files import first_readable, read_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_split(root: str, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted) and (path, class index) samples of ROOT/split; UserError on a bad layout."""
    if not os.path.isdir(root):
        raise UserError(f"data directory not found: {root}")
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
        raise UserError(f"{root} has no '{split}' folder; expected {root}/{split}/<class>/<images>")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{directory} has no class folders; expected {directory}/<class>/<images>")
    samples, empty = [], []
    for index, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(directory, name)) if _is_image(f))
        if not files:
            empty.append(name)
        samples += [(os.path.join(directory, name, f), index) for f in files]
    if empty:
        raise UserError(
            f"class folders without images in {directory}: {', '.join(empty)} "
            f"(images end with {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, samples


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentation of one sample in one epoch of a run seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextmanager
def _seeded(seed: int):
    """Seed torch, numpy and random for one sample's augmentation, then restore their states."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class ImageFolderDataset(Dataset):
    """Samples of one split. item -> (image tensor or None, class index, files skipped for it).

    Augmentation randomness is seeded per (seed, epoch, index), so a sample looks the same whichever
    process or worker loads it and however a run is interrupted and resumed; `set_epoch` moves on.
    """

    def __init__(
        self,
        root: str,
        split: str,
        transform: Callable,
        classes: Sequence[str] | None = None,
        replace_unreadable: bool = False,
        seed: int = 0,
    ):
        found, self.samples = scan_split(root, split)
        if classes is not None and list(classes) != found:
            raise UserError(
                f"{split} classes differ from the training classes: "
                f"{sorted(set(found) ^ set(classes))[:10]} are not in both"
            )
        self.classes = found
        self.transform = transform
        self.replace_unreadable = replace_unreadable
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _sample_seed(self, index: int) -> int:
        return sample_seed(self.seed, self.epoch, index)

    def _read(self, index: int):
        path, target = self.samples[index]
        image = read_rgb(path)
        return None if image is None else (image, target)

    def __getitem__(self, index: int):
        read, skipped = first_readable(
            self._read, index, len(self.samples), self.replace_unreadable, lambda i: self.samples[i][0]
        )
        if read is None:
            return None, self.samples[index][1], skipped
        image, target = read
        with _seeded(self._sample_seed(index)):
            return self.transform(image), target, skipped


def collate_skipping(batch):
    """Stack a batch, leaving out unreadable images. -> (images, targets, number of files skipped)."""
    skipped = sum(item[2] for item in batch)
    kept = [item for item in batch if item[0] is not None]
    if not kept:
        return None, None, skipped
    return torch.stack([item[0] for item in kept]), torch.tensor([item[1] for item in kept]), skipped
