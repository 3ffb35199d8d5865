"""Load checkpoints into HAFA models and their baselines: timm's state dicts, the official layouts a
family knows (Family.checkpoint_names: e.g. the original PVT and Swin code's names, and the official
HAFA code's), and the backbone part of any checkpoint this project writes.

Every weight with a counterpart is copied: LAA takes the baseline's downsampling conv (offsets stay
zero), SIA the baseline's last downsampling where its projection is that layer, a fused qkv is split
for the blocks that attend over SIA's merged tokens. What has no counterpart keeps its fresh
initialisation and is reported by name, and so does a classifier sized for another number of
classes (fine-tuning). The backbone is found inside a task's checkpoint by the key prefix that
makes its names match the model (`backbone.model.`, `backbone.body.`, ...), not by a fixed list.
"""

import logging

import torch
from timm.models._features import FeatureDictNet, FeatureGetterNet
from torch import Tensor, nn

from .checkpoint import CheckpointError, LoadReport, read_file, shorten, state_dict_of
from .layers import LAA_LAYERS, SIA
from .layers.laa import BATCH_NORMS
from .models.convert import HafaModel, family_of, sia_stages

_logger = logging.getLogger(__name__)

# A checkpoint matching less than this share of a model's parameters is taken for another model.
MIN_MATCHED_FRACTION = 0.5
# How deep inside a task's checkpoint a backbone's names may start ('backbone.body.' is 2 deep).
MAX_PREFIX_DEPTH = 3


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not belong to this model (another family or width)."""


def _split_fused_qkv(state_dict: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """A fused `X.qkv` projection as `X.q` and `X.kv` where the model has those (the blocks after SIA)."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith((".qkv.weight", ".qkv.bias")) and k not in targets:
            prefix, kind = k.rsplit(".qkv.", 1)
            if f"{prefix}.q.{kind}" in targets:
                dim = v.shape[0] // 3
                out[f"{prefix}.q.{kind}"], out[f"{prefix}.kv.{kind}"] = v[:dim], v[dim:]
                continue
        out[k] = v
    return out


def _into_sia_projection(state_dict: dict[str, Tensor], model: nn.Module, targets: dict) -> dict[str, Tensor]:
    """A baseline's downsampling at a SIA transition fills SIA's projection where that is the same layer
    (e.g. a patch merging: `X.norm`, `X.reduction` -> `X.proj.norm`, `X.proj.reduction`)."""
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, SIA))
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefixes) and not _fits(targets.get(k), v):
            prefix = next(p for p in prefixes if k.startswith(p))
            inside = f"{prefix}proj.{k[len(prefix) :]}"
            if _fits(targets.get(inside), v):
                k = inside
        out[k] = v
    return out


def _fits(target: Tensor | None, source: Tensor) -> bool:
    return target is not None and _same_up_to_unit_dims(source.shape, target.shape)


def _same_up_to_unit_dims(a: torch.Size, b: torch.Size) -> bool:
    """Equal shapes, or equal but for trailing 1s (a 1x1 conv's weight against a linear layer's)."""

    def strip(shape):
        shape = list(shape)
        while len(shape) > 2 and shape[-1] == 1:
            shape.pop()
        return shape

    return strip(a) == strip(b)


def _flattened_names(state_dict: dict[str, Tensor], wrapper: FeatureDictNet) -> dict[str, Tensor]:
    """A checkpoint's names as timm's features_only FeatureListNet / FeatureDictNet has them: it names
    the model's module 'stages.0' as its own child 'stages_0'."""
    dotted = {child.replace("_", ".") + ".": child + "." for child, _ in wrapper.named_children() if "_" in child}

    def renamed(key: str) -> str:
        prefix = next((p for p in dotted if key.startswith(p)), None)
        return key if prefix is None else dotted[prefix] + key[len(prefix) :]

    return {renamed(key): value for key, value in state_dict.items()}


def _normalise_names(state_dict: dict[str, Tensor], model: nn.Module, targets: dict) -> dict[str, Tensor]:
    """A checkpoint's names as the model has them: its family's (official layouts, the names its
    conversion gives), then a fused qkv split and a baseline's downsampling moved into SIA's projection."""
    family = family_of(model)
    if family is not None:
        state_dict = family.checkpoint_names(state_dict, targets)
    if isinstance(model, FeatureDictNet):
        state_dict = _flattened_names(state_dict, model)
    return _into_sia_projection(_split_fused_qkv(state_dict, targets), model, targets)


def _backbone_prefix(state_dict: dict[str, Tensor], model: nn.Module, targets: dict) -> str:
    """The key prefix under which the checkpoint holds this model: '' for a classification or baseline
    checkpoint, e.g. 'backbone.model.' (Semantic FPN) or 'backbone.body.' (Mask R-CNN): the candidate
    (up to MAX_PREFIX_DEPTH names deep) under which most names match the model."""
    candidates = {""}
    for key in state_dict:
        parts = key.split(".")
        candidates.update(
            ".".join(parts[:depth]) + "." for depth in range(1, min(len(parts) - 1, MAX_PREFIX_DEPTH + 1))
        )

    def matches(prefix: str) -> int:
        part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return sum(k in targets for k in _normalise_names(part, model, targets))

    return max(sorted(candidates, key=len), key=matches)


def _laa_modules(model: nn.Module) -> dict[str, str]:
    """name -> laa_norm of every LAA layer."""
    return {name: m.laa_norm for name, m in model.named_modules() if isinstance(m, LAA_LAYERS)}


def adapt_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], LoadReport]:
    """Map a checkpoint's state dict (baseline, HAFA, official, or a task's) onto `model`.
    -> (complete state dict, LoadReport).

    Raises CheckpointMismatchError when shapes differ, when LAA's normalisation differs from the
    checkpoint's (laa_norm), or when too little of the model is found.
    """
    targets = model.state_dict()
    state_dict = state_dict_of(state_dict)
    prefix = _backbone_prefix(state_dict, model, targets)
    inside = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    report = LoadReport(source_prefix=prefix, left_outside_prefix=len(state_dict) - len(inside))
    if isinstance(model, HafaModel):
        report.sia_stages = sia_stages(model.stage_aggregation)
    state_dict = _normalise_names(inside, model, targets)
    laa = _laa_modules(model)
    report.laa_norm = next(iter(set(laa.values())), None) if len(set(laa.values())) == 1 else None
    # SIA replaces a downsampling layer with layers of its own, and a classifier for another number of
    # classes is replaced too: a same-named tensor of another shape there is not a sign of another model.
    replaced = [f"{n}." for n, m in model.named_modules() if isinstance(m, SIA)]
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    replaced += [f"{classifier}."] if classifier else []
    replaced = tuple(replaced)
    # A BatchNorm whose statistics the checkpoint lacks (a baseline's LayerNorm in LAA's place) is new as
    # a whole; a checkpoint's BatchNorm for a model's LayerNorm is the other LAA mode.
    batch_norms = {n for n, m in model.named_modules() if isinstance(m, BATCH_NORMS)}
    new_norms = tuple(f"{n}." for n in batch_norms if f"{n}.running_mean" not in state_dict)
    other_mode = [
        n
        for n, m in model.named_modules()
        if n not in batch_norms and f"{n}.running_mean" in state_dict and f"{n}.weight" in targets
    ]
    if other_mode:
        raise CheckpointMismatchError(
            f"the checkpoint has BatchNorm statistics where {type(model).__name__} has none ({shorten(other_mode)}): "
            "it was trained with laa_norm='batch'; create the model with laa_norm='batch'"
        )
    adapted, mismatched = {}, []
    for name, target in targets.items():
        source = state_dict.get(name)
        if source is not None and name.startswith(new_norms):
            source = None
        if source is not None and not _same_up_to_unit_dims(source.shape, target.shape):
            if name.startswith(replaced):
                source = None
            elif name.endswith("pos_embed") and source.dim() == target.dim() == 3:
                source = _resize_pos_embed(source, target.shape[1])
        if source is None:
            report.newly_initialised.append(name)
            adapted[name] = target
        elif _same_up_to_unit_dims(source.shape, target.shape):
            adapted[name] = source.reshape(target.shape).to(target.dtype)
            report.copied.append(name)
        else:
            mismatched.append(f"{name}: checkpoint {tuple(source.shape)} vs model {tuple(target.shape)}")
    report.unused = sorted(set(state_dict) - set(report.copied))
    report.laa_batch_norms_new = any(norm.startswith(tuple(f"{m}." for m in laa)) for norm in new_norms)
    model_name = type(model).__name__
    num_params = sum(t.numel() for n, t in targets.items() if not n.endswith(("running_mean", "running_var")))
    num_named = sum(t.numel() for n, t in targets.items() if n in state_dict)
    if num_named < MIN_MATCHED_FRACTION * num_params:
        examples = ", ".join(sorted(state_dict)[:6])
        raise CheckpointMismatchError(
            f"checkpoint does not fit {model_name}: only {num_named / max(num_params, 1):.0%} of its parameters "
            f"have a counterpart by name (another model family?). Checkpoint keys look like: {examples}"
        )
    if mismatched:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {model_name}: {len(mismatched)} tensors differ in shape (another width?):\n  "
            + "\n  ".join(mismatched[:20])
        )
    return adapted, report


def _resize_pos_embed(pos_embed: Tensor, num_positions: int) -> Tensor:
    """Resize a 1 x (P [+1 class]) x C square grid position embedding to num_positions."""
    extra = pos_embed.shape[1] - int(round(pos_embed.shape[1] ** 0.5)) ** 2
    target_extra = extra if num_positions - extra == int(round((num_positions - extra) ** 0.5)) ** 2 else 0
    grid, prefix = pos_embed[:, extra:], pos_embed[:, :target_extra]
    side, new_side = int(round(grid.shape[1] ** 0.5)), int(round((num_positions - target_extra) ** 0.5))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, size=(new_side, new_side), mode="bilinear", align_corners=False)
    return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm's pretrained_filter_fn: a checkpoint's state dict -> a complete state dict for the model."""
    adapted, report = adapt_state_dict(state_dict, model)
    _logger.info("Loaded pretrained weights into %s: %s", type(model).__name__, report.summary())
    return adapted


def load_pretrained(model: nn.Module, path: str, verbose: bool = True) -> LoadReport:
    """Load a checkpoint file into `model` (weights_only, never unpickling code).

    model: a HAFA or baseline network, or timm's features_only wrapper around one. The file:
    a timm or official state dict, or any `hafa` checkpoint (its backbone part for a dense task).
    Returns a LoadReport (copied / newly initialised / unused names, LAA mode). Raises CheckpointError
    when the file is missing or unreadable, CheckpointMismatchError when it belongs to another model.
    """
    network = model.model if isinstance(model, FeatureGetterNet) else model
    adapted, report = adapt_state_dict(state_dict_of(read_file(path)), network)
    network.load_state_dict(adapted)
    if verbose:
        print(f"{path} -> {type(network).__name__}: {report.summary()}")
    return report
