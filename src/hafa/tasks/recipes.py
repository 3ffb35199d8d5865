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
from ..spec import RecipeSpec


def recipe_path(name_or_path: str) -> str:
    """A recipe file: a path, or the name of one shipped in hafa/configs (e.g. 'imagenet_hafa')."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = files("hafa") / "configs" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return str(shipped)
    known = sorted(p.name[:-5] for p in (files("hafa") / "configs").iterdir() if p.name.endswith(".yaml"))
    raise UserError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(known)})")


def load_recipe(name_or_path: str, spec: RecipeSpec) -> dict:
    """A recipe file's values over the spec's defaults, each checked (an unknown key is an error: a typo
    would silently do nothing)."""
    path = recipe_path(name_or_path)
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise UserError(f"recipe {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise UserError(f"recipe {path} must be a mapping of settings (key: value), not a {type(values).__name__}")
    return {**spec.defaults(), **spec.check_values(values, f"recipe {path}")}


def override_recipe(recipe: dict, options: dict[str, Any], settings: list[str], spec: RecipeSpec) -> dict:
    """The recipe with command-line values (already checked; None: not given) and `--set KEY=VALUE` items
    (YAML values, each checked against its setting; a key given twice takes the last), then the rules
    between settings."""
    recipe = {**recipe, **{k: v for k, v in options.items() if v is not None}}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in spec:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(spec.settings))}")
        recipe[key] = spec[key].parse(value, f"--set {key}")
    spec.check_relations(recipe)
    return recipe


def build_optimizer(model: nn.Module, recipe: dict, global_batch: int) -> torch.optim.Optimizer:
    """AdamW (by default) with lr scaled linearly from lr_base_batch to the global batch; no weight
    decay on biases, norms, position embeddings and class tokens (timm's filter + no_weight_decay)."""
    lr = recipe["lr"] * global_batch / recipe["lr_base_batch"]
    extra = dict(betas=tuple(recipe["opt_betas"]), eps=recipe["opt_eps"]) if "adam" in recipe["opt"] else {}
    return create_optimizer_v2(model, opt=recipe["opt"], lr=lr, weight_decay=recipe["weight_decay"], **extra)
