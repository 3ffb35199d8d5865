"""Reading image files the same way in the three datasets and in the data checks.

- `read_rgb`: any image PIL opens, as 8-bit RGB. Images of 16 or 32 bits per pixel (PIL modes I;16,
  I, F) are scaled to 0..255 by their own value range: clipping them (PIL's convert) would turn
  most pixels of a 16-bit photograph white.
- `read_header`: the size, mode and format from the file's header, without decoding the pixels.
- `first_readable`: the one rule for unreadable files: skipped with a warning and counted; in
  training the next readable file takes the place of an unreadable one, so batches keep their size.
- `many_problems`: one UserError listing the first problems of a check.
"""

import logging
import struct
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image

from ..errors import UserError

# What PIL raises for a file that is not an image, or a broken one (its parsers use SyntaxError,
# EOFError and struct.error for some truncated headers).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
MAX_REPLACEMENTS = 16  # unreadable files in a row that training passes over before it stops
_logger = logging.getLogger(__name__)
T = TypeVar("T")


class Header(NamedTuple):
    width: int
    height: int
    mode: str  # PIL's mode: L, RGB, I;16, ...
    format: str | None  # PIL's format: PNG, JPEG, ...


def read_header(path: str) -> Header:
    """The image's size, mode and format from its header (PIL opens lazily: no pixel is decoded).
    Raises one of UNREADABLE when the file is missing or not an image."""
    with Image.open(path) as image:
        return Header(image.width, image.height, image.mode, image.format)


def is_wide(mode: str) -> bool:
    """True for PIL's 16- and 32-bit single-channel modes (I;16, I;16B, ..., I, F)."""
    return mode in ("I", "F") or mode.startswith("I;16")


def scale_to_8bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit single-channel image as mode L, its smallest value mapped to 0 and its largest to
    255 (linearly; NaN -> 0, +inf -> 255, -inf -> 0). A constant image becomes 0."""
    values = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(values)
    low = float(values[finite].min()) if finite.any() else 0.0
    high = float(values[finite].max()) if finite.any() else 0.0
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8))


def read_rgb(path: str) -> Image.Image | None:
    """The image as 8-bit RGB, or None (with a warning naming the file) when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            if is_wide(image.mode):
                return scale_to_8bit(image).convert("RGB")
            return image.convert("RGB")
    except UNREADABLE as error:
        _logger.warning("skipping unreadable image %s: %s", path, error)
        return None


def first_readable(
    read: Callable[[int], T | None], index: int, count: int, replace: bool, name: Callable[[int], str]
) -> tuple[T | None, int]:
    """Item `index` of `count` through `read` (None when its file is unreadable). With `replace`, an
    unreadable item is replaced by the next readable one (at most MAX_REPLACEMENTS tried).
    -> (the item read, or None; the number of unreadable files passed over)."""
    attempts = min(count, MAX_REPLACEMENTS) if replace else 1
    for attempt in range(attempts):
        item = read((index + attempt) % count)
        if item is not None:
            return item, attempt
    if replace:
        raise UserError(f"{attempts} files in a row cannot be read, starting at {name(index)}; check the data")
    return None, 1


_warned: set[str] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """A warning logged once per process (a folder is listed by the data check and again by the dataset)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def many_problems(problems: list[str], limit: int = 10) -> UserError:
    """One error for a list of problems (each naming its file or id and what to do): the first `limit`."""
    if len(problems) == 1:
        return UserError(problems[0])
    more = [f"... and {len(problems) - limit} more"] if len(problems) > limit else []
    return UserError(f"{len(problems)} problems in the data:\n  " + "\n  ".join(problems[:limit] + more))
