"""Settings with a type, a range and a default, and the command-line options they check.

Every command-line option, recipe key and model option declares one of these beside its default,
and the same check serves the command line (`add_setting`: an option checked as it is parsed),
`--set`, recipe files, `--resume` and the Python API. A value that is not allowed raises
SettingError (a UserError, which the command line prints as one line, and a ValueError for Python
callers) naming the setting, the value and what is allowed:

    --clip-grad must be a number > 0, or none, not -1.0

Besides numbers, texts, lists and mappings: the devices and the output files and folders the
commands take (checked where they will be used: a GPU that is there, a path that can be written).
"""

import argparse
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from .errors import UserError

NONE_TEXTS = ("none", "null", "~")


class SettingError(UserError, ValueError):
    """A setting's value is of the wrong type or out of its range."""


# A value shown in a message is cut to this many characters (a checkpoint's field may hold anything).
SHOWN_LENGTH = 100


def shown(value: Any) -> str:
    """A value as the message shows it: texts quoted, numbers and lists as written, cut when long."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(shown(v) for v in value[:SHOWN_LENGTH]) + "]"
    else:
        text = str(value)
    text = " ".join(text.split())  # one line
    return text if len(text) <= SHOWN_LENGTH else text[: SHOWN_LENGTH - 3] + "..."


def yaml_value(text: str) -> Any:
    """A YAML scalar or list (what `--set KEY=VALUE` and recipe files hold); the text itself when it is
    not valid YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class Setting:
    """A value's type and allowed range. Subclasses say what they allow (`allowed`) and convert a
    value that is allowed (`_convert`, None when it is not)."""

    def __init__(self, default: Any = None, *, optional: bool = False, note: str = ""):
        """optional: None is allowed (it means 'not set'); note: why the range is what it is, shown
        with it."""
        self.default, self.optional, self.note = default, optional, note

    def allowed(self) -> str:
        """What the setting takes, completing 'must be ...'."""
        text = self._allowed()
        if self.note:
            text += f" ({self.note})"
        return text + (", or none" if self.optional else "")

    def _allowed(self) -> str:
        raise NotImplementedError

    def _convert(self, value: Any) -> Any | None:
        raise NotImplementedError

    def check(self, value: Any, name: str) -> Any:
        """The value in the setting's own type, or SettingError naming `name`."""
        if value is None:
            if self.optional:
                return None
            raise self.error(name, value)
        converted = self._convert(value)
        if converted is None:
            raise self.error(name, value)
        return converted

    def parse(self, text: str, name: str) -> Any:
        """A value typed on the command line (or after `--set KEY=`), checked."""
        if self.optional and text.strip().lower() in NONE_TEXTS:
            return None
        return self.check(yaml_value(text), name)

    def error(self, name: str, value: Any) -> SettingError:
        return SettingError(f"{name} must be {self.allowed()}, not {shown(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    """A finite number from a number or a numeric text (YAML 1.1 reads 1e-3 as a text)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not _is_number(value) or not math.isfinite(value):
        return None
    return float(value)


class Number(Setting):
    """A finite number in [low, high] (open ends with low_open / high_open; None: unbounded)."""

    whole = False

    def __init__(
        self,
        default: Any = None,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        optional: bool = False,
        note: str = "",
    ):
        super().__init__(default, optional=optional, note=note)
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def _kind(self) -> str:
        return "a whole number" if self.whole else "a number"

    def _bound(self, value: float) -> str:
        return str(int(value)) if self.whole or float(value).is_integer() else str(value)

    def _allowed(self) -> str:
        low, high = self.low, self.high
        if low is not None and high is not None and not (self.low_open or self.high_open):
            return f"{self._kind()} from {self._bound(low)} to {self._bound(high)}"
        parts = []
        if low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self._bound(low)}")
        if high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self._bound(high)}")
        return " ".join([self._kind(), " and ".join(parts)]) if parts else self._kind()

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def _convert(self, value: Any) -> float | int | None:
        number = _as_float(value)
        if number is None or not self.in_range(number):
            return None
        if self.whole:
            if not number.is_integer() or (isinstance(value, str) and not value.strip().lstrip("+-").isdigit()):
                return None
            return int(number)
        return number


class Whole(Number):
    """A whole number in [low, high]."""

    whole = True


class Flag(Setting):
    """true or false."""

    def _allowed(self) -> str:
        return "true or false"

    def _convert(self, value: Any) -> bool | None:
        return value if isinstance(value, bool) else None


class Choice(Setting):
    """One of a list of texts (described by `describe` when the list is long)."""

    def __init__(self, default: Any = None, *, choices: Sequence[str], describe: str = "", **kwargs):
        super().__init__(default, **kwargs)
        self.choices, self.describe = tuple(choices), describe

    def _allowed(self) -> str:
        return self.describe or "one of " + ", ".join(self.choices)

    def _convert(self, value: Any) -> str | None:
        return value if isinstance(value, str) and value in self.choices else None

    def parse(self, text: str, name: str) -> Any:
        if self.optional and text.strip().lower() in NONE_TEXTS:
            return None
        return self.check(text, name)


class Text(Setting):
    """A non-empty text for which `valid` (when given) holds; `describe` says which."""

    def __init__(self, default: Any = None, *, describe: str = "a text", valid: Callable[[str], bool] = None, **kwargs):
        super().__init__(default, **kwargs)
        self.describe, self.valid = describe, valid

    def _allowed(self) -> str:
        return self.describe

    def _convert(self, value: Any) -> str | None:
        if not isinstance(value, str) or not value or (self.valid is not None and not self.valid(value)):
            return None
        return value

    def parse(self, text: str, name: str) -> Any:
        if self.optional and text.strip().lower() in NONE_TEXTS:
            return None
        return self.check(text, name)


class Mapping(Setting):
    """A mapping of names (texts) to values; `describe` says what it holds."""

    def __init__(self, default: Any = None, *, describe: str = "a mapping of names to values", **kwargs):
        super().__init__(default, **kwargs)
        self.describe = describe

    def _allowed(self) -> str:
        return self.describe

    def _convert(self, value: Any) -> dict | None:
        return dict(value) if isinstance(value, dict) and all(isinstance(key, str) for key in value) else None


class Values(Setting):
    """A list of `length` values (or at least `min_length`), each allowed by `item`; `ordered`: each at
    least the one before it."""

    def __init__(
        self,
        default: Any = None,
        *,
        item: Setting,
        length: int | None = None,
        min_length: int = 0,
        ordered: bool = False,
        **kwargs,
    ):
        super().__init__(default, **kwargs)
        self.item, self.length, self.min_length, self.ordered = item, length, min_length, ordered

    def _allowed(self) -> str:
        item = self.item._allowed()
        if isinstance(self.item, Number):
            item = item.replace("a whole number", "whole numbers", 1).replace("a number", "numbers", 1)
        else:
            item = f"values, each {item}"
        count = str(self.length) if self.length is not None else f"at least {self.min_length}"
        order = ", in increasing order" if self.ordered else ""
        return f"a list of {count} {item}{order}"

    def _convert(self, value: Any) -> list | None:
        if not isinstance(value, (list, tuple)):
            return None
        if (self.length is not None and len(value) != self.length) or len(value) < self.min_length:
            return None
        items = [self.item._convert(v) if v is not None else None for v in value]
        if any(item is None for item in items):
            return None
        if self.ordered and any(b < a for a, b in zip(items, items[1:])):
            return None
        return items

    def parse(self, text: str, name: str) -> Any:
        if self.optional and text.strip().lower() in NONE_TEXTS:
            return None
        value = yaml_value(text)
        return self.check(value if isinstance(value, list) else [value], name)

    def parse_items(self, texts: Sequence[str], name: str) -> list:
        """The items typed one by one on the command line (nargs)."""
        return self.check([yaml_value(t) if not isinstance(self.item, (Choice, Text)) else t for t in texts], name)


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


@dataclass(frozen=True)
class Relation:
    """A rule between settings: holds(*their values) must be true; `rule` says it in words."""

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    rule: str


class RecipeSpec:
    """The settings of a recipe: each key's type, range and default, and the relations between keys."""

    def __init__(self, settings: dict[str, Setting], relations: Sequence[Relation] = ()):
        self.settings, self.relations = dict(settings), tuple(relations)

    def __getitem__(self, key: str) -> Setting:
        return self.settings[key]

    def __contains__(self, key: str) -> bool:
        return key in self.settings

    def defaults(self) -> dict[str, Any]:
        return {key: setting.default for key, setting in self.settings.items()}

    def check_values(self, values: dict, where: str) -> dict:
        """Recipe values (a file's, or a whole recipe): no unknown key, each allowed; -> converted."""
        unknown = sorted(set(values) - set(self.settings))
        if unknown:
            raise SettingError(f"{where} has unknown settings: {', '.join(unknown)}")
        return {key: self.settings[key].check(value, f"{where}: {key}") for key, value in values.items()}

    def check_relations(self, recipe: dict, where: str = "") -> None:
        """The rules between keys hold; where: what the message names first, when given."""
        for relation in self.relations:
            values = [recipe[key] for key in relation.keys]
            if all(v is not None for v in values) and not relation.holds(*values):
                current = ", ".join(f"{key} {shown(v)}" for key, v in zip(relation.keys, values))
                raise SettingError(f"{where}: {current}: {relation.rule}" if where else f"{current}: {relation.rule}")

    def check(self, recipe: dict, where: str = "recipe", name_relations: bool = False) -> dict:
        """A complete recipe: every key known and allowed (missing keys take their default), and the
        relations hold. -> the recipe with values in their settings' types. name_relations: a broken
        rule's message names `where` too (a recipe read back from a file)."""
        checked = {**self.defaults(), **self.check_values(recipe, where)}
        self.check_relations(checked, where if name_relations else "")
        return checked


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
