"""Command-line options whose values are checked as they are parsed, before any work: each declares a
setting (hafa.spec: type, range, default), and the devices and output paths the commands take."""

import argparse
import json
import os
import re
import tempfile
from typing import Any

import torch

from ..models._base import SMALLEST_INPUT
from ..spec import Setting, SettingError, Values, Whole

# The largest image side the tools take for one picture or one count (a larger one costs minutes and GBs).
LARGEST_INPUT = 4096


def image_side(default: int | None = None, *, optional: bool = False, largest: int = LARGEST_INPUT) -> Whole:
    """An image side the models take: at least SMALLEST_INPUT pixels (their coarsest stride)."""
    return Whole(default, low=SMALLEST_INPUT, high=largest, optional=optional, note="the models end at stride 32")


class Device(Setting):
    """cpu, cuda or cuda:N (N an existing GPU; under torchrun each process takes cuda:LOCAL_RANK); with
    `auto`, also 'auto' (cuda when available)."""

    def __init__(self, default: str | None = None, *, auto: bool = False):
        super().__init__(default, optional=default is None)
        self.auto = auto

    def allowed(self) -> str:
        return "cpu, cuda or cuda:N" + (", or auto" if self.auto else "")

    def _convert(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return None
        if self.auto and value == "auto":
            return value
        return value if re.fullmatch(r"cpu|cuda(?::\d+)?", value) else None

    def parse(self, text: str, name: str) -> str:
        return self.check(text, name)

    def check(self, value: Any, name: str) -> str | None:
        device = super().check(value, name)
        if device is None or not device.startswith("cuda"):
            return device
        if not torch.cuda.is_available():
            raise SettingError(f"{name} {device} asked for, but CUDA is not available here; use {name} cpu")
        index = device.partition(":")[2]
        if index:
            if int(os.environ.get("WORLD_SIZE", 1)) > 1:
                raise SettingError(
                    f"{name} {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                    f"give {name} cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
                )
            if int(index) >= torch.cuda.device_count():
                raise SettingError(f"{name} {device}: this machine has {torch.cuda.device_count()} GPU(s)")
        return device


def _nearest_existing(path: str) -> str:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def _prove_can_create_in(folder: str, name: str, path: str) -> None:
    """Create and remove a temporary file in `folder` (os.access says yes to root whatever the path)."""
    if not os.path.isdir(folder):
        raise SettingError(f"{name} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hafa-write-check-"):
            pass
    except OSError as error:
        raise SettingError(f"{name} {path}: cannot write in {folder} ({error.strerror or error})") from None


class OutputFile(Setting):
    """A file the command will write: not a folder, writable (proven by opening it, or by creating a
    temporary file where it will go), its folder made when missing."""

    def __init__(self, default: str | None = None):
        super().__init__(default, optional=default is None)

    def _allowed(self) -> str:
        return "a file that can be written"

    def _convert(self, value: Any) -> str | None:
        return value if isinstance(value, str) and value else None

    def parse(self, text: str, name: str) -> str:
        return self.check(text, name)

    def check(self, value: Any, name: str) -> str | None:
        path = super().check(value, name)
        if path is None:
            return None
        if os.path.isdir(path):
            raise SettingError(f"{name} {path} is a folder; give a file name")
        if os.path.exists(path):
            try:
                with open(path, "ab"):
                    pass
            except OSError as error:
                raise SettingError(f"{name} {path} cannot be written ({error.strerror or error})") from None
        else:
            _prove_can_create_in(_nearest_existing(os.path.dirname(os.path.abspath(path))), name, path)
        return path


class OutputDir(OutputFile):
    """A folder the command will write into: it exists and can be written in, or can be made."""

    def _allowed(self) -> str:
        return "a folder that can be written"

    def check(self, value: Any, name: str) -> str | None:
        path = Setting.check(self, value, name)
        if path is not None:
            _prove_can_create_in(_nearest_existing(path), name, path)
        return path


class CheckedOption(argparse.Action):
    """An option whose typed value is converted and checked by its setting as it is parsed."""

    def __init__(self, option_strings, dest, setting: Setting, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.setting = setting

    def __call__(self, parser, namespace, values, option_string=None):
        name = option_string or self.dest
        if isinstance(values, list):
            if not isinstance(self.setting, Values):
                raise TypeError(f"{name}: a list option needs a Values setting")
            value = self.setting.parse_items(values, name)
        else:
            value = self.setting.parse(values, name)
        setattr(namespace, self.dest, value)


def add_setting(parser, *flags: str, setting: Setting, help: str = "", default: Any = ..., **kwargs):
    """parser.add_argument for an option checked by `setting`; its help says what it takes and its default
    (the setting's, unless `default` is given: None for a recipe option that is 'not given')."""
    default = setting.default if default is ... else default
    allowed = setting.allowed().replace("%", "%%")
    if default is not None and not isinstance(default, bool):
        allowed += f"; default {' '.join(map(str, default)) if isinstance(default, (list, tuple)) else default}"
    if isinstance(setting, Values) and setting.length is not None and "nargs" not in kwargs:
        kwargs["nargs"] = setting.length
    return parser.add_argument(
        *flags, action=CheckedOption, setting=setting, default=default, help=f"{help} ({allowed})".strip(), **kwargs
    )


def check_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the options left at their defaults as if typed (an output folder that cannot be written,
    a default device that is not there), since parsing checks only what was typed."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action, CheckedOption) and value is not None and value is action.default:
            setattr(args, action.dest, action.setting.check(value, action.option_strings[0]))


def add_json_option(parser, what: str) -> None:
    add_setting(parser, "--json", setting=OutputFile(), metavar="PATH", help=f"also write {what} as JSON")


def write_json(path: str, values) -> None:
    with open(path, "w") as f:
        json.dump(values, f, indent=2)
