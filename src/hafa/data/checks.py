"""Checking a dataset completely before training spends compute on it: one function per layout.

Each function takes what the task's dataset is built from, reads every file's header (PIL opens lazily:
no image is decoded) and, for segmentation, decodes the masks (their values must be checked), in a
thread pool with a progress bar. It raises one UserError listing the first ten problems, each naming
the file or annotation id and what to do, and returns a `DataCheck` whose warnings (also logged) are
what training passes over: unreadable files (skipped), boxes beyond their image (clipped).
Refused: layouts the datasets refuse; a split whose every file is unreadable; images missing or of
another size than listed; masks that are JPEG, not one class id per pixel, of another size than their
image, or holding values that are not classes; a split whose masks label no pixel; every annotation
problem of a COCO json (data/coco.py); categories or classes that differ between splits. What
headers cannot show (a file truncated after its header) is found when it is read: it is skipped then.
"""

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image

from ..errors import UserError
from ..progress import progress as show_progress
from .coco import (
    annotation_path,
    find_missing_images,
    first_items,
    is_whole_number,
    outside_the_folder,
    parse_instances,
    size_problem,
)
from .files import UNREADABLE, many_problems, read_header
from .folder import scan_split
from .segmentation import IGNORE_INDEX, LabelMapping, Pair, data_pairs, mask_file_problem
from .segmentation import size_problem as mask_size_problem

_logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DataCheck:
    """What a check read and what it warns about (files skipped, boxes clipped); the warnings are logged."""

    files: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


class FileReport(NamedTuple):
    problems: tuple[str, ...] = ()
    unreadable: str | None = None  # "path: reason" of a file that exists but cannot be read
    labelled: bool = True  # a mask with at least one pixel that is not ignored


class _Findings:
    def __init__(self):
        self.start = time.perf_counter()
        self.problems: list[str] = []
        self.report = DataCheck()

    def readability(self, reports: list[FileReport], what: str) -> None:
        """A problem when every file of `what` is unreadable, a warning when some are."""
        unreadable = [r.unreadable for r in reports if r.unreadable]
        if unreadable and len(unreadable) == len(reports):
            self.problems.append(
                f"none of the {len(reports)} files of {what} can be read (first: {unreadable[0]}); check the files"
            )
        elif unreadable:
            self.report.warnings.append(
                f"{len(unreadable)} of the {len(reports)} files of {what} cannot be read and will be skipped: "
                + "; ".join(unreadable[:5])
                + (" ..." if len(unreadable) > 5 else "")
            )

    def finish(self) -> DataCheck:
        if self.problems:
            raise many_problems(self.problems)
        for warning in self.report.warnings:
            _logger.warning(warning)
        self.report.seconds = time.perf_counter() - self.start
        return self.report


def _scan(
    items: Sequence[T], inspect: Callable[[T], FileReport], what: str, workers: int | None, progress: bool
) -> list[FileReport]:
    """inspect(item) for every item, in a thread pool (header reads wait on the disk), in order."""
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        show_progress(total=len(items), desc=f"checking {what}", unit="file", enabled=progress) as bar,
    ):
        reports = []
        for report in pool.map(inspect, items):
            reports.append(report)
            bar.update()
    return reports


def _inspect_image(path: str) -> FileReport:
    try:
        read_header(path)
    except UNREADABLE as error:
        return FileReport(unreadable=f"{path}: {error}")
    return FileReport()


def check_image_folder(
    root: str, splits: Sequence[str] = ("train", "val"), *, workers: int | None = None, progress: bool = True
) -> DataCheck:
    """Classification data in ROOT/<split>/<class>/<image> (ImageFolderDataset's layout): the layout,
    the same classes in every split, every image's header. UserError listing the problems."""
    findings = _Findings()
    classes = None
    for split in splits:
        try:
            found, samples = scan_split(root, split)
        except UserError as error:
            findings.problems.append(str(error))
            continue
        if classes is None:
            classes = (split, found)
        elif found != classes[1]:
            findings.problems.append(
                f"{split} classes differ from the {classes[0]} classes: "
                f"{sorted(set(found) ^ set(classes[1]))[:10]} are not in both"
            )
        reports = _scan([path for path, _ in samples], _inspect_image, f"{root}/{split}", workers, progress)
        findings.readability(reports, f"{root}/{split}")
        findings.report.files += len(reports)
    return findings.finish()


def _mask_values(mask: Image.Image) -> np.ndarray:
    """The distinct values of a mask (decodes it)."""
    if mask.mode in ("L", "P"):
        return np.flatnonzero(mask.histogram())
    return np.unique(np.asarray(mask)).astype(np.int64)


def _inspect_pair(pair: Pair, labels: LabelMapping) -> FileReport:
    image_path, mask_path = pair
    try:
        image = read_header(image_path)
    except UNREADABLE as error:
        return FileReport(unreadable=f"{image_path}: {error}")
    try:
        with Image.open(mask_path) as mask:
            problem = mask_file_problem(mask_path, mask.mode, mask.format)
            if problem:
                return FileReport(problems=(problem,))
            values, mask_size = _mask_values(mask), mask.size
    except UNREADABLE as error:
        return FileReport(unreadable=f"{mask_path}: {error}")
    problems = [
        mask_size_problem(mask_path, mask_size, image_path, (image.width, image.height)),
        labels.problem(mask_path, invalid) if (invalid := labels.invalid(values)).size else None,
    ]
    return FileReport(problems=tuple(p for p in problems if p), labelled=not labels.ignored(values).all())


def check_segmentation_pairs(
    data: dict,
    num_classes: int,
    reduce_zero_label: bool,
    splits: Sequence[str] = ("train", "val"),
    *,
    workers: int | None = None,
    progress: bool = True,
) -> DataCheck:
    """Segmentation pairs of a data description (as `data_pairs` takes: the ADE20K layout or folders):
    every image's header, every mask decoded (format, mode, size, values against the classes and the
    ignore index), at least one labelled pixel per split. UserError listing the problems."""
    labels = LabelMapping(num_classes, reduce_zero_label)
    findings = _Findings()
    for split in splits:
        try:
            pairs = data_pairs(data, split)
        except UserError as error:
            findings.problems.append(str(error))
            continue
        what = f"the {split} split (images {os.path.dirname(pairs[0][0])}, masks {os.path.dirname(pairs[0][1])})"
        reports = _scan(pairs, partial(_inspect_pair, labels=labels), what, workers, progress)
        findings.problems += [problem for report in reports for problem in report.problems]
        findings.readability(reports, what)
        readable = [r for r in reports if not r.unreadable and not r.problems]
        if readable and not any(r.labelled for r in readable):
            ignore = f"0 and {IGNORE_INDEX}" if reduce_zero_label else str(IGNORE_INDEX)
            findings.problems.append(
                f"no mask of {what} labels any pixel (every value is ignore: {ignore}); check --reduce-zero-label"
            )
        findings.report.files += 2 * len(reports)
    return findings.finish()


def _inspect_coco_image(image_dir: str, json_path: str, image: dict) -> FileReport:
    path = os.path.join(image_dir, image["file_name"])
    try:
        header = read_header(path)
    except UNREADABLE as error:
        return FileReport(unreadable=f"{path}: {error}")
    if not (is_whole_number(image.get("width")) and is_whole_number(image.get("height"))):
        return FileReport()  # the json's problem, reported by parse_instances
    problem = size_problem(path, (header.width, header.height), json_path, image)
    return FileReport(problems=(problem,) if problem else ())


def _boxes_beyond_their_image(content: dict) -> list[int]:
    images = {image["id"]: image for image in content["images"]}
    beyond = []
    for annotation in content["annotations"]:
        x, y, w, h = annotation["bbox"]
        image = images[annotation["image_id"]]
        if x < 0 or y < 0 or x + w > image["width"] or y + h > image["height"]:
            beyond.append(annotation["id"])
    return beyond


def check_coco(root: str, splits: Sequence[str], *, workers: int | None = None, progress: bool = True) -> DataCheck:
    """COCO splits of ROOT (CocoInstances' layout: ROOT/annotations/instances_<split>.json and
    ROOT/<split>/): every annotation field (data/coco.py), the same categories in every split, every
    listed image present, readable and of the listed size. UserError listing the problems."""
    findings = _Findings()
    categories = None
    for split in splits:
        path, image_dir = annotation_path(root, split), os.path.join(root, split)
        content, problems = parse_instances(path)
        findings.problems += problems
        if not isinstance(content, dict) or not isinstance(content.get("images"), list):
            continue
        if not problems:
            found = sorted((c["id"], c["name"]) for c in content["categories"])
            if categories is None:
                categories = (path, found)
            elif found != categories[1]:
                findings.problems.append(
                    f"the categories of {path} differ from those of {categories[0]}: "
                    f"{sorted(set(found) ^ set(categories[1]))[:10]} are not in both"
                )
            beyond = _boxes_beyond_their_image(content)
            if beyond:
                findings.report.warnings.append(
                    f"{path}: {len(beyond)} boxes extend beyond their image (clipped in training): "
                    f"annotations {first_items(beyond)}"
                )
        images = [  # a name leading out of the folder is a problem of the json: no file outside is read
            image
            for image in content["images"]
            if isinstance(image, dict)
            and isinstance(image.get("file_name"), str)
            and image["file_name"]
            and not outside_the_folder(image["file_name"])
        ]
        missing, problem = find_missing_images(path, image_dir, [image["file_name"] for image in images])
        if problem:
            findings.problems.append(problem)
        images = [image for image in images if image["file_name"] not in missing]
        reports = _scan(images, partial(_inspect_coco_image, image_dir, path), image_dir, workers, progress)
        findings.problems += [problem for report in reports for problem in report.problems]
        findings.readability(reports, image_dir)
        findings.report.files += len(reports)
    return findings.finish()
