"""One factory for the networks of the three tasks.

`create_network(task, name, args)` builds a classifier, a Semantic FPN or a Mask R-CNN from a timm
model name and its complete keyword arguments; `*_arguments` make those arguments from a task's
settings. A checkpoint stores them (model.args), so the same call rebuilds the trained network.
"""

import inspect

import timm
import torch
from torch import nn

from ..errors import UserError, unknown_name
from ..models.mask_rcnn import create_mask_rcnn
from ..models.semantic_fpn import create_semantic_fpn
from ..models.table import BASELINE

# The HAFA constructor options a user may choose (a model takes those its constructor names).
HAFA_OPTIONS = ("stage_aggregation", "cluster_ratio", "knn_k", "cluster_qkv", "laa_norm")


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
    strict_img_size ... are left out where it does not) and, for a HAFA model, every HAFA option it
    takes, as chosen or else the model's own value. HAFA options are ignored for baselines."""
    parameters = inspect.signature(type(_on_meta_device(name)).__init__).parameters
    args = {key: value for key, value in common.items() if key in parameters}
    if name not in BASELINE:
        return args
    not_taken = sorted(set(hafa_options) - set(parameters))
    if not_taken:
        raise UserError(f"{name} does not take {', '.join(not_taken)}")
    resolved = _on_meta_device(name, **hafa_options)
    for option in HAFA_OPTIONS:
        if option in parameters:
            value = hafa_options.get(option, getattr(resolved, option, parameters[option].default))
            args[option] = list(value) if isinstance(value, tuple) else value
    return args


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
