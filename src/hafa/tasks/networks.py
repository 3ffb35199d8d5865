"""One factory for the networks of the three tasks.

`create_network(task, name, args)` builds a classifier, a Semantic FPN or a Mask R-CNN from a timm
model name and its complete keyword arguments; `*_arguments` make those arguments from a task's
settings. A checkpoint stores them (model.args), so the same call rebuilds the trained network.
"""

import inspect

import timm
import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint, CheckpointError, load_exactly, names_shown
from ..errors import UserError, unknown_name
from ..models._base import HAFA_OPTIONS as MODEL_HAFA_OPTIONS
from ..models.mask_rcnn import create_mask_rcnn
from ..models.semantic_fpn import create_semantic_fpn
from ..models.table import BASELINE
from ..pretrained import adapt_state_dict

# The HAFA constructor options a user may choose (a model takes those its constructor names).
HAFA_OPTIONS = tuple(MODEL_HAFA_OPTIONS)


def _on_meta_device(name: str, **kwargs) -> nn.Module:
    """The model built without memory or computation, to read its constructor and resolved options."""
    if name not in timm.list_models():
        raise unknown_name("model", name, timm.list_models())
    try:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    except ValueError as error:  # a HAFA option out of its range
        raise UserError(f"{name}: {error}") from error


def backbone_arguments(name: str, hafa_options: dict, **common) -> dict:
    """Complete timm keywords for `name`: the `common` ones its constructor takes (img_size,
    strict_img_size ... are left out where it does not; a HAFA model passes them to the model it
    converts) and, for a HAFA model, every HAFA option, as chosen or else the model's own value.
    HAFA options are ignored for baselines."""
    model = _on_meta_device(name)
    constructor = getattr(model, "base_class", type(model)).__init__
    parameters = inspect.signature(constructor).parameters
    args = {key: value for key, value in common.items() if key in parameters}
    if name not in BASELINE:
        return args
    resolved = _on_meta_device(name, **hafa_options)
    for option in HAFA_OPTIONS:
        value = hafa_options.get(option, getattr(resolved, option))
        args[option] = list(value) if isinstance(value, tuple) else value
    return args


def sized_model(name: str, img_size: int, hafa_options: dict | None = None, **kwargs) -> nn.Module:
    """timm's `name` built for img_size x img_size inputs where its constructor takes a size (Swin's
    windows are laid out for it: a baseline Swin refuses another size), with kwargs; what the
    measurements (bench, models, ablate) compare a HAFA model and its baseline on."""
    return timm.create_model(name, **backbone_arguments(name, hafa_options or {}, img_size=img_size, **kwargs))


def classifier_arguments(
    name: str, *, num_classes: int, hafa_options: dict, img_size: int, drop_path_rate: float = 0.0, drop_rate=0.0
) -> dict:
    return backbone_arguments(
        name,
        hafa_options,
        num_classes=num_classes,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        drop_rate=drop_rate,
    )


def segmenter_arguments(
    name: str, *, num_classes: int, hafa_options: dict, drop_path_rate: float, dropout: float
) -> dict:
    backbone = backbone_arguments(name, hafa_options, drop_path_rate=drop_path_rate, strict_img_size=False)
    return dict(num_classes=num_classes, backbone=backbone, dropout=dropout, fpn_channels=256, head_channels=128)


def detector_arguments(
    name: str, *, num_classes: int, hafa_options: dict, drop_path_rate: float, fpn_channels: int, rcnn: dict
) -> dict:
    backbone = backbone_arguments(
        name, hafa_options, num_classes=0, drop_path_rate=drop_path_rate, strict_img_size=False
    )
    return dict(num_classes=num_classes, backbone=backbone, fpn_channels=fpn_channels, rcnn=dict(rcnn))


def create_network(task: str, name: str, args: dict) -> nn.Module:
    """The network of `task` on the timm model `name`, from complete arguments (see `*_arguments`)."""
    if task == "classification":
        return timm.create_model(name, **args)
    if task == "segmentation":
        return create_semantic_fpn(name, **args)
    if task == "detection":
        return create_mask_rcnn(name, **args)
    raise ValueError(f"unknown task {task!r}")


def backbone_of(task: str, network: nn.Module) -> nn.Module:
    """The timm model inside a task's network, whose names match a classification checkpoint's."""
    if task == "segmentation":
        return getattr(network.backbone, "model", network.backbone)
    if task == "detection":
        return network.backbone.body
    return network


# HAFA options without weights: a checkpoint's model can be rebuilt with others (e.g. drawn at another
# cluster ratio) and still load every tensor.
WEIGHTLESS_OPTIONS = ("cluster_ratio", "knn_k")


def build_model(checkpoint: Checkpoint, weightless_options: dict | None = None) -> nn.Module:
    """The exact network a checkpoint was trained as, with all of its weights, in eval mode on the CPU;
    weightless_options: other values of WEIGHTLESS_OPTIONS for its backbone."""
    args = checkpoint.model_args
    if weightless_options:
        not_weightless = sorted(set(weightless_options) - set(WEIGHTLESS_OPTIONS))
        if not_weightless:
            raise ValueError(f"only {', '.join(WEIGHTLESS_OPTIONS)} can differ from a checkpoint, not {not_weightless}")
        if "backbone" in args:
            args = dict(args, backbone=dict(args["backbone"], **weightless_options))
        else:
            args = dict(args, **weightless_options)
    model = create_network(checkpoint.task, checkpoint.model_name, args)
    load_exactly(model, checkpoint.state_dict, checkpoint.path, checkpoint.model_name)
    return model.eval()


def build_classifier_from_state_dict(
    state_dict: dict[str, Tensor],
    path: str,
    model_name: str | None,
    num_classes: int | None,
    hafa_options: dict | None = None,
    img_size: int = 224,
) -> nn.Module:
    """A classifier for a plain state dict (timm or official names), which must hold all its weights:
    `model_name` with `num_classes` classes and the HAFA options (those without weights may differ)."""
    if model_name is None or num_classes is None:
        raise CheckpointError(
            f"{path} is a plain state dict: say which model it holds with --model and how many classes its "
            "classifier has with --num-classes"
        )
    args = classifier_arguments(model_name, num_classes=num_classes, hafa_options=hafa_options or {}, img_size=img_size)
    model = create_network("classification", model_name, args)
    adapted, report = adapt_state_dict(state_dict, model)
    problems = []
    if report.newly_initialised:
        problems.append(f"missing {len(report.newly_initialised)} ({names_shown(report.newly_initialised)})")
    if report.unused:
        problems.append(f"extra {len(report.unused)} ({names_shown(report.unused)})")
    if problems:
        raise CheckpointError(
            f"{path} does not hold exactly the weights of {model_name} with {num_classes} classes: "
            f"{'; '.join(problems)}. Nothing is computed from newly initialised weights."
        )
    model.load_state_dict(adapted)
    return model.eval()
