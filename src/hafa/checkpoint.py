"""Reading and writing checkpoint files: every file this project reads or writes goes through here.

A checkpoint written by a `hafa` command is a dict of plain data (loadable with weights_only=True):

    format="hafa", version=1, task="classification" | "segmentation" | "detection",
    model={"name": str, "args": dict}, classes=[...], settings={...}, state_dict={name: Tensor},
    metrics={...}, and in last.pth the training state (optimizer, scheduler, scaler, train_state, rng, data).

model.args are the complete keyword arguments of the task layer's network factory, so that the
network rebuilt from them is exactly the trained one, and every one of its tensors
must come from the file (`load_exactly`), and be finite: a command never evaluates, predicts, exports
or draws from newly initialised weights. This module knows the file format only, never the networks:
it checks that every field is one it knows, of its type (`as_checkpoint`); what the values mean
(the model, its arguments, the settings) is checked by the commands that read them, as the command
line's own options are.

Plain state dicts (timm, the official PVT releases) and their usual wrappers ("state_dict",
"model", "model_ema", a "module." prefix from DistributedDataParallel) are read too.
"""

import os
import pickle
import warnings
import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import UserError
from .spec import shown

FORMAT = "hafa"
VERSION = 1
# task -> (the command that writes its checkpoints, the command that evaluates them)
TASK_COMMANDS = {
    "classification": ("hafa train", "hafa eval"),
    "segmentation": ("hafa seg-train", "hafa seg-eval"),
    "detection": ("hafa det-train", "hafa det-eval"),
}
REQUIRED_FIELDS = ("task", "model", "classes", "settings", "state_dict")
# Every field a checkpoint may hold: best.pth's, and what last.pth adds to resume (TRAINING_STATE_FIELDS).
TRAINING_STATE_FIELDS = ("optimizer", "scheduler", "scaler", "train_state", "rng", "samples")
FIELDS = ("format", "version", *REQUIRED_FIELDS, "metrics", "epoch", *TRAINING_STATE_FIELDS)
NAMES_SHOWN = 8


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot serve the request: unreadable, another model, another task."""


@dataclass
class Checkpoint:
    """A checkpoint written by a `hafa` training command (see the module docstring)."""

    path: str
    task: str
    model_name: str
    model_args: dict
    classes: list[str]
    settings: dict
    state_dict: dict[str, Tensor]
    metrics: dict = field(default_factory=dict)
    content: dict = field(default_factory=dict)  # the whole file, training state included

    def describe(self) -> str:
        """e.g. 'a segmentation checkpoint of hafa_pvt_v2_b0 (written by hafa seg-train)'."""
        return f"a {self.task} checkpoint of {self.model_name} (written by {TASK_COMMANDS[self.task][0]})"


def _why_unreadable(path: str, error: Exception) -> str:
    """One line saying why torch.load could not read `path`."""
    with open(path, "rb") as f:
        start = f.read(4)
    if not start:
        return f"{path} is empty (0 bytes), not a checkpoint"
    if not start.startswith((b"PK", b"\x80")):
        return f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return (
            f"{path} holds Python objects other than tensors and plain data (loading it could run code); "
            "hafa reads only plain data (torch.load with weights_only=True): give a state dict saved with "
            "torch.save(model.state_dict(), PATH)"
        )
    if isinstance(error, EOFError) or "zip archive" in str(error) or "central directory" in str(error):
        return f"{path} is damaged: it ends early or its zip archive is corrupt (an interrupted save or copy?)"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"cannot read {path} as a PyTorch checkpoint: {first_line}"


def read_file(path: str) -> object:
    """The content of a checkpoint file as data (never unpickles code); .safetensors too."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the unpickler's protocol remarks
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if path.endswith(".safetensors"):
            raise CheckpointError(f"cannot read {path} as safetensors: {error}") from error
        raise CheckpointError(_why_unreadable(path, error)) from error


def write_file(path: str, content: dict) -> None:
    """torch.save to a temporary file, then rename into place: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(content, partial)
    os.replace(partial, path)


def state_dict_of(content: object) -> dict[str, Tensor]:
    """The model's state dict inside a file's content: ours ("state_dict"), or a plain or wrapped one."""
    if isinstance(content, dict):
        for key in ("state_dict", "model_ema", "model"):
            if isinstance(content.get(key), dict) and content[key]:
                content = content[key]
                break
    if not isinstance(content, dict) or not content or not all(isinstance(v, Tensor) for v in content.values()):
        raise CheckpointError("the file does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in content.items()}


def is_hafa_checkpoint(content: object) -> bool:
    return isinstance(content, dict) and content.get("format") == FORMAT


def checkpoint_content(
    *,
    task: str,
    model_name: str,
    model_args: dict,
    classes: list[str],
    settings: dict,
    state_dict: dict[str, Tensor] | None = None,
    metrics: dict | None = None,
    **training_state,
) -> dict:
    """The dict a checkpoint file holds (format 1); training_state: what last.pth adds to resume."""
    if task not in TASK_COMMANDS:
        raise ValueError(f"unknown task {task!r}")
    return dict(
        format=FORMAT,
        version=VERSION,
        task=task,
        model=dict(name=model_name, args=model_args),
        classes=list(classes),
        settings=settings,
        state_dict=state_dict,
        metrics=metrics or {},
        **training_state,
    )


def _described(value: object) -> str:
    """A field's value as a message shows it: its type, and the value itself when short."""
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_mapping(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def _is_whole(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _field_problem(content: dict) -> str | None:
    """What is wrong with the fields of a hafa checkpoint's content (the file format: their types), or
    None. What the values mean (the model, its arguments, the settings) is the task layer's to check."""
    unknown = [key for key in content if key not in FIELDS]
    if unknown:
        return f"unknown field {_described(unknown[0])} (a hafa checkpoint holds {', '.join(FIELDS)})"
    if content.get("format") != FORMAT:
        return f"format must be {FORMAT!r}, not {_described(content.get('format'))}"
    model = content["model"]
    if not isinstance(model, dict):
        return f"model must be a mapping of name and args, not {_described(model)}"
    extra = [key for key in model if key not in ("name", "args")]
    if extra:
        return f"model holds name and args only, not {extra[0]!r}"
    missing = [key for key in ("name", "args") if key not in model]
    if missing:
        return f"model lacks {' and '.join(missing)}"
    if not (isinstance(model["name"], str) and model["name"]):
        return f"model.name must be a model's name, not {_described(model['name'])}"
    if not _is_mapping(model["args"]):
        return f"model.args must be a mapping of keyword arguments (names to values), not {_described(model['args'])}"
    classes = content["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        return f"classes must be a list of at least one class name, not {_described(classes)}"
    if not _is_mapping(content["settings"]):
        return f"settings must be a mapping of settings, not {_described(content['settings'])}"
    state_dict = content["state_dict"]
    if not (_is_mapping(state_dict) and state_dict):
        return f"state_dict must be a mapping of names to tensors, not {_described(state_dict)}"
    not_tensors = [name for name, t in state_dict.items() if not isinstance(t, Tensor)]
    if not_tensors:
        first = not_tensors[0]
        return f"state_dict must map names to tensors; {first!r} holds {_described(state_dict[first])}"
    if not _is_mapping(content.get("metrics", {})):
        return f"metrics must be a mapping of names to values, not {_described(content['metrics'])}"
    if "epoch" in content and not _is_whole(content["epoch"], 0):
        return f"epoch must be a whole number >= 0, not {_described(content['epoch'])}"
    for key in ("optimizer", "scheduler", "scaler", "train_state"):
        if key in content and not isinstance(content[key], dict):
            return f"{key} must be a mapping (a state dict), not {_described(content[key])}"
    if "rng" in content and not (
        isinstance(content["rng"], list) and content["rng"] and all(_is_mapping(r) for r in content["rng"])
    ):
        return f"rng must be a list of RNG states (one mapping per process), not {_described(content['rng'])}"
    samples = content.get("samples")
    if samples is not None and not (
        isinstance(samples, Tensor) and samples.dtype == torch.uint8 and samples.dim() == 1
    ):
        return f"samples must be the training files' names packed as a uint8 tensor, not {_described(samples)}"
    return None


def as_checkpoint(content: dict, path: str) -> Checkpoint:
    """A hafa checkpoint's content as a Checkpoint; CheckpointError when it is not one this version reads
    (another version, a field missing, unknown or of another type: one line naming the field)."""
    if type(content.get("version")) is not int or content["version"] != VERSION:
        raise CheckpointError(
            f"{path} is a hafa checkpoint of format version {shown(content.get('version'))}; this hafa reads "
            f"version {VERSION}"
        )
    missing = [key for key in REQUIRED_FIELDS if key not in content]
    if missing or not isinstance(content.get("task"), str) or content["task"] not in TASK_COMMANDS:
        raise CheckpointError(
            f"{path} is an incomplete hafa checkpoint (missing {', '.join(missing) or 'a task'}; task must be one "
            f"of {', '.join(TASK_COMMANDS)})"
        )
    problem = _field_problem(content)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return Checkpoint(
        path=path,
        task=content["task"],
        model_name=content["model"]["name"],
        model_args=content["model"]["args"],
        classes=list(content["classes"]),
        settings=content["settings"],
        state_dict=content["state_dict"],
        metrics=content.get("metrics") or {},
        content=content,
    )


def read_checkpoint_or_state_dict(path: str) -> Checkpoint | dict[str, Tensor]:
    """A hafa checkpoint, or else the plain state dict the file holds (timm, official PVT)."""
    content = read_file(path)
    if is_hafa_checkpoint(content):
        return as_checkpoint(content, path)
    if isinstance(content, dict) and "config" in content and "model" in content:
        raise CheckpointError(
            f"{path} was written by an older hafa (before checkpoint format {VERSION}); it does not record its "
            "model completely: retrain it, or read its weights with hafa.load_pretrained"
        )
    try:
        return state_dict_of(content)
    except CheckpointError:
        raise CheckpointError(f"{path} holds neither a hafa checkpoint nor a state dict of tensors") from None


def read_checkpoint(path: str, task: str, command: str) -> Checkpoint:
    """A checkpoint of `task`, for `command` (e.g. 'hafa seg-eval'); one clear line for anything else."""
    content = read_checkpoint_or_state_dict(path)
    if not isinstance(content, Checkpoint):
        raise CheckpointError(
            f"{path} is a plain state dict; {command} takes a checkpoint of {TASK_COMMANDS[task][0]} "
            "(best.pth / last.pth), which records the model, its classes and its recipe"
        )
    check_task(content, task, command)
    return content


def check_task(checkpoint: Checkpoint, task: str, command: str) -> None:
    if checkpoint.task != task:
        raise CheckpointError(
            f"{checkpoint.path} is {checkpoint.describe()}; {command} takes {task} checkpoints "
            f"(evaluate this one with {TASK_COMMANDS[checkpoint.task][1]})"
        )


def names_shown(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def load_exactly(model: nn.Module, state_dict: dict[str, Tensor], source: str, model_name: str) -> None:
    """Load a state dict that must hold every tensor of `model`, with its shape, and nothing else."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    reshaped = [
        f"{name} {tuple(state_dict[name].shape)} vs {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state_dict and state_dict[name].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} ({names_shown(missing)})")
    if extra:
        problems.append(f"extra {len(extra)} ({names_shown(extra)})")
    if reshaped:
        problems.append(f"other shapes in {len(reshaped)} (checkpoint vs model: {names_shown(reshaped)})")
    if problems:
        raise CheckpointError(
            f"{source} does not hold exactly the weights of {model_name}: {'; '.join(problems)}. "
            "Nothing is computed from newly initialised weights."
        )
    check_finite(state_dict, source)
    model.load_state_dict(state_dict)


def check_finite(state_dict: dict[str, Tensor], source: str) -> None:
    """Weights must be finite: a model with a NaN or infinite weight computes NaN, and an evaluation of it
    would report a meaningless number."""
    broken = [name for name, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise CheckpointError(
            f"{source} holds weights that are not finite (NaN or infinity) in {len(broken)} tensors "
            f"({names_shown(broken)}): was the run diverging when it was saved? Nothing is computed from them"
        )


def check_model_options(
    checkpoint: Checkpoint,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    hafa_options: dict | None = None,
) -> None:
    """Model options given on the command line must agree with the checkpoint: it alone says the model."""
    conflicts = []
    if model_name is not None and model_name != checkpoint.model_name:
        conflicts.append(f"--model {model_name} vs the checkpoint's {checkpoint.model_name}")
    if num_classes is not None and num_classes != len(checkpoint.classes):
        conflicts.append(f"--num-classes {num_classes} vs the checkpoint's {len(checkpoint.classes)}")
    saved = checkpoint.model_args.get("backbone", checkpoint.model_args)
    for option, value in (hafa_options or {}).items():
        value = list(value) if isinstance(value, tuple) else value
        if saved.get(option) != value:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            conflicts.append(f"--{option.replace('_', '-')} {shown} vs the checkpoint's {saved.get(option)}")
    if conflicts:
        raise CheckpointError(
            f"{checkpoint.path} holds another model than the options say: {'; '.join(conflicts)}. "
            "Leave the model options out: the checkpoint says what its model is"
        )


def pack_names(names: list[str]) -> Tensor:
    """A list of names as one compressed uint8 tensor (plain data, small even for ImageNet's file list)."""
    return torch.frombuffer(bytearray(zlib.compress("\n".join(names).encode())), dtype=torch.uint8)


def unpack_names(packed: Tensor) -> list[str]:
    text = zlib.decompress(packed.numpy().tobytes()).decode()
    return text.split("\n") if text else []


# How many names a LoadReport's summary (and a mismatch message) shows of a longer list.
NAMES_SHOWN = 12


@dataclass
class LoadReport:
    """What a load did: tensor names copied, newly initialised (the model's own init) and unused (the
    checkpoint's, under its backbone prefix); laa_norm: the model's LAA mode (None without LAA); source:
    where the tensors came from, as the summary names it."""

    copied: list[str] = field(default_factory=list)
    newly_initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    source_prefix: str = ""
    left_outside_prefix: int = 0
    laa_norm: str | None = None
    laa_batch_norms_new: bool = False
    source: str = "the checkpoint"

    @property
    def new_layers(self) -> list[str]:
        """The modules with at least one newly initialised tensor."""
        return sorted({name.rpartition(".")[0] or name for name in self.newly_initialised})

    def summary(self) -> str:
        lines = [f"copied {len(self.copied)} tensors from {self.source}"]
        if self.source_prefix:
            lines[0] += f" (its keys under '{self.source_prefix}'; {self.left_outside_prefix} others left out)"
        if self.laa_norm == "batch":
            lines.append(
                "LAA mode: laa_norm='batch' (BatchNorm + GELU, the paper's network)"
                + (
                    f"; its BatchNorms are new, so the model does not compute the function of {self.source} "
                    "(laa_norm='baseline' would)"
                    if self.laa_batch_norms_new
                    else ""
                )
            )
        elif self.laa_norm == "baseline":
            lines.append("LAA mode: laa_norm='baseline' (the baseline's norm; with zero offsets LAA is its conv)")
        if self.newly_initialised:
            lines.append(f"new layers ({len(self.new_layers)}): {shorten(self.new_layers)}")
        if self.unused:
            lines.append(f"unused from {self.source} ({len(self.unused)}): {shorten(self.unused)}")
        return "\n".join(lines)


def shorten(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f", ... ({len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else "")
