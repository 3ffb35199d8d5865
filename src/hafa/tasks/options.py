"""Checks of command-line values made before any work starts: numbers in range, the device, the
smallest input size a model takes, and output paths that can be written."""

import os
import re

import torch

from ..errors import UserError
from ..models._base import SMALLEST_INPUT


def check_positive(value: float | None, option: str, integer: bool = False) -> None:
    """None (not given) or > 0; integer: a whole number too."""
    if value is None:
        return
    if integer and (isinstance(value, bool) or not float(value).is_integer()):
        raise UserError(f"{option} takes a whole number, not {value}")
    if not value > 0:
        raise UserError(f"{option} must be greater than 0, not {value}")


def check_workers(workers: int) -> None:
    if workers < 0:
        raise UserError(f"--workers must be 0 (load in the main process) or more, not {workers}")


def check_input_size(size: int | list[int], option: str) -> None:
    """An image side a model takes: at least SMALLEST_INPUT pixels."""
    for side in size if isinstance(size, (list, tuple)) else [size]:
        if side < SMALLEST_INPUT:
            raise UserError(
                f"{option} {side} is too small: the models here take images of at least "
                f"{SMALLEST_INPUT} x {SMALLEST_INPUT} pixels (their coarsest stride)"
            )


def check_device(device: str | None) -> None:
    """cpu, cuda or cuda:N (N an existing GPU); under torchrun each process takes cuda:LOCAL_RANK."""
    if device is None:
        return
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise UserError(f"--device takes cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    if match.group(1) is not None:
        index = int(match.group(1))
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise UserError(
                f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                "give --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def check_output_file(path: str | None, option: str) -> None:
    """A file the command will write: not a folder, in a folder that exists or can be made, writable."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UserError(f"{option} {path} is a folder; give a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), option)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path} exists and cannot be written")


def check_output_dir(path: str, option: str) -> None:
    """A folder the command will write into: it exists and is writable, or can be made."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot write in {existing}")


def check_recipe(recipe: dict, *, whole: tuple = (), positive: tuple = (), sizes: tuple = ()) -> None:
    """Recipe settings (from the file, --set or an option) in range, named as their option."""
    for key in whole:
        check_positive(recipe[key], _option(key), integer=True)
    for key in positive:
        check_positive(recipe[key], _option(key))
    for key in sizes:
        check_input_size(recipe[key], _option(key))


def _option(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def check_run_options(args) -> None:
    """The options every task command has, checked before anything is loaded."""
    check_workers(args.workers)
    check_device(args.device)
    check_positive(getattr(args, "batch_size", None), "--batch-size", integer=True)
    check_output_file(getattr(args, "json", None), "--json")
    if hasattr(args, "resume"):  # a training command: runs go to OUTPUT/<model>
        check_output_dir(args.output, "--output")
