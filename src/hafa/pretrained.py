"""Load checkpoints into HAFA models: baselines (timm's pvt_v2 / swin, official PVT v1 and v2), HAFA
checkpoints of the official code, and the backbone part of any checkpoint this project writes.

Every weight with a counterpart is copied: LAA takes the baseline's downsampling conv (offsets stay
zero), SIA the baseline's last downsampling where its projection is that layer, Swin's fused qkv is
split for the blocks that attend over SIA's merged tokens. What has no counterpart keeps its fresh
initialisation and is reported by name, and so does a classifier sized for another number of
classes (fine-tuning). The backbone is found inside a task's checkpoint by the key prefix that
makes its names match the model (`backbone.model.`, `backbone.body.`, ...), not by a fixed list.
"""

import logging
import re
from dataclasses import dataclass, field

import torch
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_file, state_dict_of
from .layers import SIA
from .layers.laa import BATCH_NORMS

_logger = logging.getLogger(__name__)

# A checkpoint matching less than this share of a model's parameters is taken for another model.
MIN_MATCHED_FRACTION = 0.5
NAMES_SHOWN = 12

# Official PVT v1 / v2 top-level names (patch_embed1..4, block1..4, pos_embed1..4, norm1..4, cls_token).
_OFFICIAL_ROOT = re.compile(r"^(patch_embed|block|pos_embed|norm)\d$|^cls_token$")
# Inside the official HAFA's LAA (patch_embed2, patch_embed3: DeformablePatchMerging): the deformable conv
# is mmcv's DeformConv2dPack `dconv`, which keeps its offset predictor as `conv_offset`, and the BatchNorm
# is `norm_layer`. Renamed in this order.
_OFFICIAL_LAA_NAMES = {"dconv.conv_offset.": "offset.", "dconv.": "proj.", "norm_layer.": "norm."}
# Inside the official HAFA's SIA (patch_embed4: CTM): the token conv `conv` (a 3x3/s2 conv with its `skip`),
# the keys/values path `Multiscale` (`skip`, `depth_conv`, `point_conv`) and its LayerNorm `norm1`.
# Renamed in this order; CTM's score bias and unused `proj_q` have no counterpart and are reported unused.
_OFFICIAL_SIA_NAMES = {
    "conv.skip.": "skip.",
    "conv.": "proj.",
    "Multiscale.skip.": "kv_proj.",
    "Multiscale.depth_conv.": "kv_dwconv.",
    "Multiscale.point_conv.": "kv_pwconv.",
    "norm1.": "kv_norm.",
}


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not belong to this model (another family or width)."""


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
            lines.append(f"new layers ({len(self.new_layers)}): {_shorten(self.new_layers)}")
        if self.unused:
            lines.append(f"unused from {self.source} ({len(self.unused)}): {_shorten(self.unused)}")
        return "\n".join(lines)


def _shorten(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f", ... ({len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else "")


def _official_pvt_to_staged(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official PVT v1/v2 and HAFA names (patch_embed1..4, pos_embed1..4, block1..4, norm1..4, cls_token) -> ours."""
    if not any(k.startswith(("patch_embed1.", "block1.")) for k in state_dict):
        return state_dict
    v1 = any(k.startswith("pos_embed1") for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        k = k.replace("dwconv.dwconv", "dwconv")
        k = re.sub(r"^block(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.", k)
        k = re.sub(r"^norm(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm.", k)
        k = re.sub(r"^pos_embed(\d)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed", k)
        if v1:
            k = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed.", k)
            k = "stages.3.cls_token" if k == "cls_token" else k
        else:
            k = k.replace("patch_embed1.", "patch_embed.")
            k = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample.", k)
        for official, ours in _OFFICIAL_LAA_NAMES.items():
            k = re.sub(rf"^(stages\.[12]\.(?:patch_embed|downsample)\.){re.escape(official)}", rf"\g<1>{ours}", k)
        for official, ours in _OFFICIAL_SIA_NAMES.items():
            k = re.sub(rf"^(stages\.3\.(?:patch_embed|downsample)\.){re.escape(official)}", rf"\g<1>{ours}", k)
        out[k] = v
    return out


def _original_swin_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The original Swin layout (a downsampling ends a stage, the classifier is `head`) -> timm's."""
    if "layers.0.downsample.reduction.weight" in state_dict:
        state_dict = {
            re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v
            for k, v in state_dict.items()
        }
        state_dict = {
            ("head.fc." + k[5:] if k.startswith("head.") and not k.startswith("head.fc.") else k): v
            for k, v in state_dict.items()
        }
    return {k: v for k, v in state_dict.items() if not k.endswith(("relative_position_index", "attn_mask"))}


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
    (Swin's patch merging: `X.norm`, `X.reduction` -> `X.proj.norm`, `X.proj.reduction`)."""
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


def _normalise_names(state_dict: dict[str, Tensor], model: nn.Module, targets: dict) -> dict[str, Tensor]:
    """A checkpoint's names as the model has them: official PVT and Swin layouts as timm's, the names a
    HAFA model's family gives its converted layers (Family.checkpoint_names), fused qkv split, and a
    baseline's downsampling into SIA's projection."""
    state_dict = _official_pvt_to_staged(state_dict)
    if any(k.startswith("layers.") for k in state_dict):
        state_dict = _original_swin_to_timm(state_dict)
    family = getattr(model, "family", None)  # a HAFA model (hafa.models.convert.HafaModel)
    if family is not None:
        state_dict = family.checkpoint_names(state_dict, targets)
    return _into_sia_projection(_split_fused_qkv(state_dict, targets), model, targets)


def _backbone_prefix(state_dict: dict[str, Tensor], model: nn.Module, targets: dict) -> str:
    """The key prefix under which the checkpoint holds this model: '' for a classification or baseline
    checkpoint, e.g. 'backbone.model.' (Semantic FPN) or 'backbone.body.' (Mask R-CNN): the candidate
    under which most names match the model."""
    roots = {k.split(".", 1)[0] for k in targets}
    candidates = {""}
    for key in state_dict:
        parts = key.split(".")
        for depth in range(1, min(len(parts) - 1, 4)):
            if parts[depth] in roots or _OFFICIAL_ROOT.match(parts[depth]):
                candidates.add(".".join(parts[:depth]) + ".")

    def matches(prefix: str) -> int:
        part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return sum(k in targets for k in _normalise_names(part, model, targets))

    return max(sorted(candidates, key=len), key=matches)


def _laa_modules(model: nn.Module) -> dict[str, str]:
    """name -> laa_norm of every LAA layer (LAA, Swin's LAA patch merging)."""
    return {name: m.laa_norm for name, m in model.named_modules() if hasattr(m, "reset_offsets")}


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
            f"the checkpoint has BatchNorm statistics where {type(model).__name__} has none ({_shorten(other_mode)}): "
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

    model: a HAFA or baseline network, or timm's features_only wrapper around a HAFA model. The file:
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
