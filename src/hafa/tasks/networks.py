"""One factory for the networks of the three tasks.

`create_network(task, name, args)` builds a classifier, a Semantic FPN or a Mask R-CNN from a timm
model name and its complete keyword arguments; `*_arguments` make those arguments from a task's
settings. A checkpoint stores them (model.args), so the same call rebuilds the trained network.
"""

import inspect
from functools import cache

import timm
import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint, CheckpointError, check_finite, load_exactly, names_shown
from ..errors import UserError, unknown_name
from ..layers import HafaOptions
from ..models.common import MODEL_ARGUMENTS
from ..models.mask_rcnn import create_mask_rcnn
from ..models.registry import default_stage_aggregation
from ..models.semantic_fpn import create_semantic_fpn
from ..models.table import BASELINE
from ..pretrained import adapt_state_dict
from ..spec import Flag, Mapping, Setting, SettingError, Whole, shown
from .run_settings import DETECTION_RECIPE, MAX_CHANNELS, image_side

# torchvision MaskRCNN settings a recipe may set (the image sizes, proposals and sampled RoIs).
RCNN_OPTIONS = (
    "min_size",
    "max_size",
    "rpn_pre_nms_top_n_train",
    "rpn_post_nms_top_n_train",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image",
    "box_batch_size_per_image",
    "box_detections_per_img",
)

# What a checkpoint's model.args may hold: the keywords the *_arguments functions below write, each with
# its setting. A backbone takes those of BACKBONE_ARGUMENTS its constructor names, and a HAFA model the
# HAFA options; nothing else ever reaches timm.create_model (checkpoint_path, pretrained,
# pretrained_cfg_overlay ... would make a checkpoint decide what other file is read).
BACKBONE_ARGUMENTS: dict[str, Setting] = dict(
    num_classes=MODEL_ARGUMENTS["num_classes"],
    img_size=image_side(),
    drop_path_rate=MODEL_ARGUMENTS["drop_path_rate"],
    drop_rate=MODEL_ARGUMENTS["drop_rate"],
    strict_img_size=Flag(),
)
# The backbone of a dense task has no classifier (the task layer writes num_classes=0, or none).
DENSE_BACKBONE_CLASSES = Whole(0, low=0, high=0, note="a dense task's backbone has no classifier")
_WIDTH = Whole(low=1, high=MAX_CHANNELS)
_KEYWORDS = Mapping(describe="a mapping of keyword arguments")


class GroupNormWidth(Whole):
    """A width that GroupNorm's 32 groups divide (Semantic FPN's head)."""

    def _allowed(self) -> str:
        return super()._allowed() + ", a multiple of 32 (GroupNorm's groups)"

    def _convert(self, value):
        width = super()._convert(value)
        return width if width is not None and width % 32 == 0 else None


# A task's network's own arguments (classification: the backbone's, at the top level).
NETWORK_ARGUMENTS: dict[str, dict[str, Setting]] = dict(
    classification={},
    segmentation=dict(
        num_classes=Whole(low=1),
        backbone=_KEYWORDS,
        dropout=MODEL_ARGUMENTS["drop_rate"],
        fpn_channels=_WIDTH,
        head_channels=GroupNormWidth(low=32, high=MAX_CHANNELS),
    ),
    detection=dict(num_classes=Whole(low=1), backbone=_KEYWORDS, fpn_channels=_WIDTH, rcnn=_KEYWORDS),
)
REQUIRED_ARGUMENTS = ("num_classes", "backbone")
RCNN_ARGUMENTS: dict[str, Setting] = {key: DETECTION_RECIPE[key] for key in RCNN_OPTIONS}


def _on_meta_device(name: str, **kwargs) -> nn.Module:
    """The model built without memory or computation, to read its constructor and resolved options."""
    if name not in timm.list_models():
        raise unknown_name("model", name, timm.list_models())
    try:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    except ValueError as error:  # a HAFA option out of its range
        raise UserError(f"{name}: {error}") from error


@cache
def constructor_parameters(name: str) -> frozenset[str]:
    """The keyword arguments the constructor of timm's `name` names (a HAFA model's: its base model's)."""
    model = _on_meta_device(name)
    constructor = getattr(model, "base_class", type(model)).__init__
    return frozenset(inspect.signature(constructor).parameters)


def backbone_arguments(name: str, options: HafaOptions, **common) -> dict:
    """Complete timm keywords for `name`: the `common` ones its constructor takes (img_size,
    strict_img_size ... are left out where it does not; a HAFA model passes them to the model it
    converts) and, for a HAFA model, every HAFA option, its transitions resolved to its default where
    `options` leaves them to it. HAFA options are ignored for baselines."""
    parameters = constructor_parameters(name)
    args = {key: value for key, value in common.items() if key in parameters}
    if name not in BASELINE:
        return args
    if options.stage_aggregation is None:
        options = options.replace(stage_aggregation=default_stage_aggregation(name))
    return {**args, **options.keywords()}


def check_hafa_options(name: str, options: HafaOptions) -> None:
    """A UserError unless timm's `name` can be built with `options` (e.g. SIA only before a stage that
    attends), found on the meta device before any work."""
    if name in BASELINE:
        _on_meta_device(name, **backbone_arguments(name, options))


def sized_model(name: str, img_size: int, options: HafaOptions = HafaOptions(), **kwargs) -> nn.Module:
    """timm's `name` built for img_size x img_size inputs where its constructor takes a size (Swin's
    windows are laid out for it: a baseline Swin refuses another size), with kwargs; what the
    measurements (bench, models, ablate) compare a HAFA model and its baseline on."""
    return timm.create_model(name, **backbone_arguments(name, options, img_size=img_size, **kwargs))


def classifier_arguments(
    name: str, *, num_classes: int, options: HafaOptions, img_size: int, drop_path_rate: float = 0.0, drop_rate=0.0
) -> dict:
    return backbone_arguments(
        name,
        options,
        num_classes=num_classes,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        drop_rate=drop_rate,
    )


def segmenter_arguments(
    name: str, *, num_classes: int, options: HafaOptions, drop_path_rate: float, dropout: float
) -> dict:
    backbone = backbone_arguments(name, options, drop_path_rate=drop_path_rate, strict_img_size=False)
    return dict(num_classes=num_classes, backbone=backbone, dropout=dropout, fpn_channels=256, head_channels=128)


def detector_arguments(
    name: str, *, num_classes: int, options: HafaOptions, drop_path_rate: float, fpn_channels: int, rcnn: dict
) -> dict:
    backbone = backbone_arguments(name, options, num_classes=0, drop_path_rate=drop_path_rate, strict_img_size=False)
    return dict(num_classes=num_classes, backbone=backbone, fpn_channels=fpn_channels, rcnn=dict(rcnn))


def _check_keywords(args: object, settings: dict[str, Setting], where: str, required: tuple = ()) -> dict:
    """Keyword arguments read from a file: a mapping of the names `settings` knows, each value allowed by
    its setting, the `required` ones present. SettingError naming `where`, the name and the value."""
    args = _KEYWORDS.check(args, where)
    unknown = [key for key in args if key not in settings]
    if unknown:
        known = ", ".join(settings) or "none"
        raise SettingError(
            f"{where}: {shown(unknown[0])} is not an argument a hafa checkpoint records here (it records: {known})"
        )
    missing = [key for key in required if key in settings and key not in args]
    if missing:
        raise SettingError(f"{where} lacks {', '.join(missing)}")
    return {key: settings[key].check(value, f"{where}.{key}") for key, value in args.items()}


def _check_backbone_arguments(name: str, args: object, where: str, dense: bool) -> dict:
    """A backbone's keywords in a checkpoint: those of BACKBONE_ARGUMENTS its constructor names (no
    classifier for a dense task's), the HAFA options for a HAFA model, each allowed; then the model built
    from them on the meta device (no memory, no file), where a combination the model refuses (e.g. SIA
    before a stage without attention) says so."""
    parameters = constructor_parameters(name)
    settings = {key: setting for key, setting in BACKBONE_ARGUMENTS.items() if key in parameters}
    if dense and "num_classes" in settings:
        settings["num_classes"] = DENSE_BACKBONE_CLASSES
    if name in BASELINE:
        settings.update(HafaOptions.SETTINGS)
    checked = _check_keywords(args, settings, where)
    try:
        _on_meta_device(name, **checked)
    except UserError as error:
        raise SettingError(f"{where}: {error}") from None
    except Exception as error:  # timm asserts on some combinations of otherwise allowed values
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SettingError(f"{where}: {name} cannot be built with these arguments ({reason})") from None
    return checked


def check_network_arguments(task: str, name: str, args: object, where: str) -> dict:
    """A checkpoint's model.args (`where`, e.g. 'best.pth: model.args') for a network of `task` on timm's
    `name`, checked as the command line's options are: only what the *_arguments functions write, each
    value in its type and range. -> the arguments in their settings' types (3.0 classes as 3); a
    SettingError (a UserError) naming the argument and the value otherwise."""
    if task == "classification":
        return _check_backbone_arguments(name, args, where, dense=False)
    checked = _check_keywords(args, NETWORK_ARGUMENTS[task], where, REQUIRED_ARGUMENTS)
    checked["backbone"] = _check_backbone_arguments(name, checked["backbone"], f"{where}.backbone", dense=True)
    if "rcnn" in checked:
        checked["rcnn"] = _check_keywords(checked["rcnn"], RCNN_ARGUMENTS, f"{where}.rcnn")
    return checked


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
    options: HafaOptions = HafaOptions(),
    img_size: int = 224,
) -> nn.Module:
    """A classifier for a plain state dict (timm or official names), which must hold all its weights:
    `model_name` with `num_classes` classes and the HAFA options (those without weights may differ)."""
    if model_name is None or num_classes is None:
        raise CheckpointError(
            f"{path} is a plain state dict: say which model it holds with --model and how many classes its "
            "classifier has with --num-classes"
        )
    args = classifier_arguments(model_name, num_classes=num_classes, options=options, img_size=img_size)
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
    check_finite(adapted, path)
    model.load_state_dict(adapted)
    return model.eval()
