"""Recipe files (YAML, shipped in hafa/configs or the user's), their command-line overrides, and the
optimizer a recipe describes."""

import os
from importlib.resources import files
from typing import Any

import torch
import yaml
from timm.optim import create_optimizer_v2
from torch import nn

from ..errors import UserError


def recipe_path(name_or_path: str) -> str:
    """A recipe file: a path, or the name of one shipped in hafa/configs (e.g. 'imagenet_hafa')."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = files("hafa") / "configs" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return str(shipped)
    known = sorted(p.name[:-5] for p in (files("hafa") / "configs").iterdir() if p.name.endswith(".yaml"))
    raise UserError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(known)})")


def load_recipe(name_or_path: str, defaults: dict) -> dict:
    """Recipe values over the defaults; an unknown key is an error (a typo would silently do nothing)."""
    path = recipe_path(name_or_path)
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise UserError(f"recipe {path} is not valid YAML: {error}") from error
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise UserError(f"recipe {path} has unknown settings: {', '.join(unknown)}")
    return {**defaults, **values}


def override_recipe(recipe: dict, options: dict[str, Any], settings: list[str]) -> dict:
    """The recipe with command-line values (None: not given) and `--set KEY=VALUE` items (YAML values)."""
    recipe = {**recipe, **{k: v for k, v in options.items() if v is not None}}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in recipe:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(recipe))}")
        recipe[key] = _recipe_value(f"{key}={value}", value, recipe[key])
    return recipe


def _recipe_value(item: str, text: str, current: Any) -> Any:
    """A YAML value of the setting's type; numbers YAML 1.1 reads as strings (1e-3) become floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if current is None or value is None:
        return value
    if isinstance(current, bool) or isinstance(value, bool):
        if isinstance(current, bool) and isinstance(value, bool):
            return value
    elif isinstance(current, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                value = text
        if isinstance(value, int) or (isinstance(value, float) and isinstance(current, float)):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(current, list):
        if isinstance(value, list):
            return value
    elif isinstance(value, str):
        return value
    raise UserError(f"--set {item}: expected {_kind_of(current)}, like the recipe's {current!r}")


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, list):
        return "a list [a, b, ...]"
    return "a text"


def build_optimizer(model: nn.Module, recipe: dict, global_batch: int) -> torch.optim.Optimizer:
    """AdamW (by default) with lr scaled linearly from lr_base_batch to the global batch; no weight
    decay on biases, norms, position embeddings and class tokens (timm's filter + no_weight_decay)."""
    lr = recipe["lr"] * global_batch / recipe["lr_base_batch"]
    extra = dict(betas=tuple(recipe["opt_betas"]), eps=recipe["opt_eps"]) if "adam" in recipe["opt"] else {}
    return create_optimizer_v2(model, opt=recipe["opt"], lr=lr, weight_decay=recipe["weight_decay"], **extra)
