"""Reading and writing checkpoint files: every file this project reads or writes goes through here.

A checkpoint written by a `hafa` command is a dict of plain data (loadable with weights_only=True):

    format="hafa", version=1, task="classification" | "segmentation" | "detection",
    model={"name": str, "args": dict}, classes=[...], settings={...}, state_dict={name: Tensor}, ...

Plain state dicts (timm, the official PVT releases) and their usual wrappers ("state_dict",
"model", "model_ema", a "module." prefix from DistributedDataParallel) are read too.
"""

import os

import torch
from torch import Tensor

from .errors import UserError

FORMAT = "hafa"
VERSION = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot serve the request: unreadable, another model, another task."""


def read_file(path: str) -> object:
    """The content of a checkpoint file as data (never unpickles code); .safetensors too."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint (corrupt, or not plain data): {error}"
        ) from error


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
