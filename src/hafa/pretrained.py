"""Import baseline checkpoints (timm's pvt_v2 / swin, official PVT v1 and v2) into HAFA models.

Every weight with a counterpart is copied: the LAA convs take the baseline's downsampling weights
(offsets stay zero), Swin's fused qkv is split for the blocks that attend over SIA's merged tokens.
What has no counterpart keeps its fresh initialisation and is reported by name, and so does a
classifier sized for another number of classes (fine-tuning).
"""

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_file, state_dict_of
from .layers import SIA

_logger = logging.getLogger(__name__)

# A checkpoint matching less than this share of a model's parameters is taken for another model.
MIN_MATCHED_FRACTION = 0.5


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not belong to this model (another family or width)."""


@dataclass
class LoadReport:
    copied: list[str] = field(default_factory=list)
    newly_initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"copied {len(self.copied)} tensors from the checkpoint"]
        if self.newly_initialised:
            lines.append(f"newly initialised ({len(self.newly_initialised)}): {', '.join(self.newly_initialised)}")
        if self.unused:
            lines.append(f"unused from the checkpoint ({len(self.unused)}): {', '.join(self.unused)}")
        return "\n".join(lines)


def _official_pvt_to_staged(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official PVT v1/v2 names (patch_embed1..4, pos_embed1..4, block1..4, norm1..4, cls_token) -> ours."""
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
        out[k] = v
    return out


def _swin_to_hafa(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm Swin names -> ours: drop buffers, move original downsample indices, split fused qkv
    where our block has separate q and kv (the blocks after SIA)."""
    if "layers.0.downsample.reduction.weight" in state_dict:  # original Swin: downsample ends a stage
        state_dict = {
            re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v
            for k, v in state_dict.items()
        }
        state_dict = {
            ("head.fc." + k[5:] if k.startswith("head.") and not k.startswith("head.fc.") else k): v
            for k, v in state_dict.items()
        }
    targets = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        if k.endswith(("attn.qkv.weight", "attn.qkv.bias")) and k not in targets:
            prefix, kind = k.rsplit(".qkv.", 1)
            if f"{prefix}.q.{kind}" in targets:
                dim = v.shape[0] // 3
                out[f"{prefix}.q.{kind}"], out[f"{prefix}.kv.{kind}"] = v[:dim], v[dim:]
                continue
        out[k] = v
    return out


def adapt_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> tuple:
    """Map a baseline (or HAFA) state dict onto `model`. -> (complete state dict, LoadReport).

    Raises CheckpointMismatchError when shapes differ or too little of the model is found.
    """
    state_dict = _official_pvt_to_staged(state_dict_of(state_dict))
    if any(k.startswith("layers.") for k in state_dict):
        state_dict = _swin_to_hafa(state_dict, model)
    targets = model.state_dict()
    # SIA replaces a downsampling layer with layers of its own, and a classifier for another number of
    # classes is replaced too: a same-named tensor of another shape there is not a sign of another model.
    replaced = [f"{n}." for n, m in model.named_modules() if isinstance(m, SIA)]
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    replaced += [f"{classifier}."] if classifier else []
    replaced = tuple(replaced)
    report = LoadReport()
    adapted, mismatched = {}, []
    for name, target in targets.items():
        source = state_dict.get(name)
        if source is not None and source.shape != target.shape and name.startswith(replaced):
            source = None
        if source is None:
            report.newly_initialised.append(name)
            adapted[name] = target
        elif source.shape != target.shape:
            if name.endswith("pos_embed") and source.dim() == target.dim() == 3:
                adapted[name] = _resize_pos_embed(source, target.shape[1])
                report.copied.append(name)
            else:
                mismatched.append(f"{name}: checkpoint {tuple(source.shape)} vs model {tuple(target.shape)}")
        else:
            adapted[name] = source.to(target.dtype)
            report.copied.append(name)
    report.unused = sorted(set(state_dict) - set(report.copied))
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
    """timm's pretrained_filter_fn: a baseline state dict -> a complete state dict for the model."""
    adapted, report = adapt_state_dict(state_dict, model)
    _logger.info("Loaded pretrained weights into %s: %s", type(model).__name__, report.summary())
    return adapted


def load_pretrained(model: nn.Module, path: str, verbose: bool = True) -> LoadReport:
    """Load a baseline or HAFA checkpoint file into `model` (weights_only, never unpickling code).

    Returns a LoadReport (copied / newly initialised / unused names). Raises CheckpointError when the
    file is missing or unreadable, CheckpointMismatchError when it belongs to another model.
    """
    checkpoint = state_dict_of(read_file(path))
    adapted, report = adapt_state_dict(checkpoint, model)
    model.load_state_dict(adapted)
    if verbose:
        print(f"{path} -> {type(model).__name__}: {report.summary()}")
    return report
