"""What a training run's settings are: each task's recipe (every recipe key with its type, range and
default, and the rules between keys), the recipe files and `--set` that override it, and the
settings of a run, one dataclass per task. A run's settings are built once from the recipe and the
options, checked (`check`), saved in the checkpoint (as a dict) and read back from it by the
commands that evaluate or predict, through the same checks (`from_saved`): every field of its type
and range, no field unknown."""

import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib.resources import files
from typing import Any, ClassVar, TypeVar

import yaml
from timm.optim import list_optimizers

from ..data.segmentation import IGNORE_INDEX
from ..errors import UserError
from ..layers import HafaOptions
from ..models.common import SMALLEST_INPUT
from ..spec import (
    Choice,
    Flag,
    Mapping,
    Number,
    RecipeSpec,
    Relation,
    Setting,
    SettingError,
    Text,
    Values,
    Whole,
    shown,
)

Settings = TypeVar("Settings", bound="RunSettings")


# The widest neck or head a network takes (channels): wider ones would not fit in memory.
MAX_CHANNELS = 4096
# The largest image side the tools take for one picture or one count (a larger one costs minutes and GBs).
LARGEST_INPUT = 4096


def image_side(default: int | None = None, *, optional: bool = False, largest: int = LARGEST_INPUT) -> Whole:
    """An image side the models take: at least SMALLEST_INPUT pixels (their coarsest stride)."""
    return Whole(default, low=SMALLEST_INPUT, high=largest, optional=optional, note="the models end at stride 32")


def _optimizer() -> Choice:
    return Choice("adamw", choices=list_optimizers(), describe="an optimizer timm knows (timm.optim.list_optimizers())")


def _auto_augment_known(policy: str) -> bool:
    """Whether timm builds a training transform with this auto-augment policy."""
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception:  # timm asserts or raises on unknown policies
        return False
    return True


def _share(default: float, **kwargs) -> Number:
    """A probability or fraction in [0, 1]."""
    return Number(default, low=0, high=1, **kwargs)


def _rate(default: float) -> Number:
    """A dropout or drop-path rate in [0, 1)."""
    return Number(default, low=0, high=1, high_open=True)


def _positive(default: float, **kwargs) -> Number:
    return Number(default, low=0, low_open=True, **kwargs)


def _at_least_zero(default: float, **kwargs) -> Number:
    return Number(default, low=0, **kwargs)


def _optimisation(*, batch_size: int, lr: float, lr_base_batch: int, weight_decay: float) -> dict[str, Setting]:
    """What every task's optimisation has, with the task's defaults."""
    return dict(
        batch_size=Whole(batch_size, low=1, note="per process"),
        lr=_positive(lr, note="at a global batch of lr_base_batch, scaled linearly"),
        lr_base_batch=Whole(lr_base_batch, low=1),
        opt=_optimizer(),
        opt_betas=Values([0.9, 0.999], item=Number(low=0, high=1, high_open=True), length=2),
        opt_eps=_positive(1e-8),
        weight_decay=_at_least_zero(weight_decay),
        clip_grad=_positive(None, optional=True, note="the largest gradient norm"),
        seed=Whole(0, low=0),
    )


_MEAN = Values([0.485, 0.456, 0.406], item=Number(), length=3)
_STD = Values([0.229, 0.224, 0.225], item=_positive(None), length=3)

# Image classification (the paper's ImageNet recipe, Sec. 4.1, on timm's pipeline).
CLASSIFICATION_RECIPE = RecipeSpec(
    dict(
        **_optimisation(batch_size=128, lr=1e-3, lr_base_batch=128, weight_decay=0.05),
        epochs=Whole(300, low=1),
        min_lr=_at_least_zero(1e-5),
        warmup_epochs=_at_least_zero(5),
        warmup_lr=_at_least_zero(1e-6),
        img_size=image_side(224),
        crop_pct=Number(0.875, low=0, low_open=True, high=1),
        interpolation=Choice("bicubic", choices=("bicubic", "bilinear", "nearest", "random")),
        mean=_MEAN,
        std=_STD,
        scale=Values([0.08, 1.0], item=Number(low=0, low_open=True, high=1), length=2, ordered=True),
        ratio=Values([0.75, 1.3333], item=_positive(None), length=2, ordered=True),
        hflip=_share(0.5),
        color_jitter=_at_least_zero(0.4),
        auto_augment=Text(
            "rand-m9-mstd0.5-inc1",
            describe="an auto-augment policy timm knows (rand-..., augmix-..., original, v0, 3a)",
            valid=_auto_augment_known,
            optional=True,
        ),
        reprob=_share(0.25),
        mixup=_at_least_zero(0.8),
        cutmix=_at_least_zero(1.0),
        mixup_prob=_share(1.0),
        mixup_switch_prob=_share(0.5),
        smoothing=Number(0.1, low=0, high=1, high_open=True),
        drop_path=_rate(0.1),
        drop_rate=_rate(0.0),
    ),
    [
        Relation(
            ("warmup_epochs", "epochs"),
            lambda w, e: w <= e,
            "the warm-up cannot be longer than the run: shorten it with --warmup-epochs (or run longer with --epochs)",
        )
    ],
)

# Semantic segmentation (Semantic FPN, the paper's ADE20K recipe).
SEGMENTATION_RECIPE = RecipeSpec(
    dict(
        **_optimisation(batch_size=16, lr=1e-4, lr_base_batch=16, weight_decay=1e-4),
        iterations=Whole(40000, low=1, note="rounded to whole epochs"),
        min_lr=_at_least_zero(0.0),
        poly_power=_positive(0.9),
        warmup_iterations=Whole(0, low=0),
        warmup_lr=_at_least_zero(1e-6),
        scale=Values([2048, 512], item=image_side(), length=2, note="long side, short side"),
        ratio_range=Values([0.5, 2.0], item=_positive(None), length=2, ordered=True),
        crop_size=Values([512, 512], item=image_side(), length=2, note="height, width"),
        cat_max_ratio=Number(0.75, low=0, low_open=True, high=1),
        hflip=_share(0.5),
        color_jitter=Values(
            [0.125, 0.5, 0.5, 0.1],
            item=_at_least_zero(None),
            length=4,
            optional=True,
            note="brightness, contrast, saturation, hue",
        ),
        mean=_MEAN,
        std=_STD,
        drop_path=_rate(0.1),
        head_dropout=_rate(0.1),
        eval_mode=Choice("whole", choices=("whole", "slide")),
        eval_crop=Values([512, 512], item=image_side(), length=2),
        eval_stride=Values([341, 341], item=Whole(low=1), length=2),
    ),
    [
        Relation(
            ("warmup_iterations", "iterations"),
            lambda w, i: w <= i,
            "the warm-up cannot be longer than the run: shorten it with --set warmup_iterations=N (or run longer "
            "with --iterations)",
        ),
        Relation(
            ("eval_stride", "eval_crop"),
            lambda stride, crop: all(s <= c for s, c in zip(stride, crop)),
            "sliding windows must touch or overlap: each side of eval_stride at most eval_crop's",
        ),
        Relation(
            ("color_jitter",), lambda jitter: jitter[3] <= 0.5, "the hue jitter (the fourth value) is at most 0.5"
        ),
    ],
)

# Detection and instance segmentation (Mask R-CNN, the paper's COCO 1x recipe).
DETECTION_RECIPE = RecipeSpec(
    dict(
        **_optimisation(batch_size=2, lr=1e-4, lr_base_batch=16, weight_decay=1e-4),
        epochs=Whole(12, low=1),
        lr_steps=Values([8, 11], item=Whole(low=1), ordered=True, note="epochs after which lr drops"),
        lr_step_rate=Number(0.1, low=0, low_open=True, high=1),
        warmup_iters=Whole(500, low=0),
        warmup_ratio=Number(0.001, low=0, low_open=True, high=1),
        min_size=image_side(800),
        max_size=image_side(1333),
        hflip=_share(0.5),
        filter_empty=Flag(True),
        fpn_channels=Whole(256, low=1, high=MAX_CHANNELS),
        drop_path=_rate(0.1),
        rpn_pre_nms_top_n_train=Whole(2000, low=1),
        rpn_post_nms_top_n_train=Whole(1000, low=1),
        rpn_pre_nms_top_n_test=Whole(1000, low=1),
        rpn_post_nms_top_n_test=Whole(1000, low=1),
        rpn_batch_size_per_image=Whole(256, low=1),
        box_batch_size_per_image=Whole(512, low=1),
        box_detections_per_img=Whole(100, low=1),
        eval_batch_size=Whole(2, low=1),
    ),
    [Relation(("min_size", "max_size"), lambda low, high: low <= high, "min_size must be at most max_size")],
)


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


# Run options every task has.
RUN_OPTIONS = dict(
    workers=Whole(2, low=0, note="0: load in the main process"),
    amp=Choice("none", choices=("none", "bf16", "fp16"), note="fp16 on a GPU only"),
    keep=Choice("both", choices=("both", "best", "last"), note="what a finished run keeps"),
    compile=Choice(
        None,
        choices=("default", "reduce-overhead", "max-autotune", "aot_eager"),
        optional=True,
        note="inductor's modes; aot_eager: traced, no code generated",
    ),
)


def _text(describe: str, **kwargs) -> Text:
    return Text(None, describe=describe, **kwargs)


class SegmentationData(Setting):
    """Where segmentation pairs are, as data_pairs takes it: {'layout': 'ade20k', 'root': PATH} or
    {'layout': 'folders', 'train': [IMAGES, MASKS], 'val': [IMAGES, MASKS]} (a split may be missing)."""

    def _allowed(self) -> str:
        return (
            "{'layout': 'ade20k', 'root': PATH} or {'layout': 'folders', 'train': [IMAGES, MASKS], "
            "'val': [IMAGES, MASKS]}"
        )

    def _convert(self, value: Any) -> dict | None:
        if not isinstance(value, dict):
            return None
        if value.get("layout") == "ade20k" and set(value) == {"layout", "root"}:
            return dict(value) if isinstance(value["root"], str) and value["root"] else None
        pair = Values(item=Text())
        if value.get("layout") == "folders" and set(value) - {"layout"} and set(value) <= {"layout", "train", "val"}:
            splits = {split: pair._convert(folders) for split, folders in value.items() if split != "layout"}
            if all(folders is not None and len(folders) == 2 for folders in splits.values()):
                return dict(layout="folders", **splits)
        return None


_DEVICE = re.compile(r"cpu|cuda(?::\d+)?")


def _split_name(name: str) -> bool:
    """A COCO split's name: one folder of the data root (ROOT/<split>, ROOT/annotations/instances_<split>.json)."""
    return re.fullmatch(r"[\w.-]+", name) is not None and name not in (".", "..")


@dataclass(kw_only=True)
class RunSettings:
    """What every training run is: a model on data with a recipe (the task's recipe settings, checked
    against its spec), in a run folder."""

    RECIPE = RecipeSpec({})
    # Every field's type and range (the recipe's keys, the run options and the HAFA options are checked
    # by `check` against their own specs): what a checkpoint's settings are read back through.
    FIELDS: ClassVar[dict[str, Setting]] = dict(
        model=_text("a timm model name"),
        recipe=Mapping(describe="a mapping of recipe settings"),
        run_dir=_text("a folder"),
        resume=Flag(),
        hafa_options=Mapping(describe="a mapping of HAFA options"),
        device=_text("cpu, cuda or cuda:N", valid=_DEVICE.fullmatch, optional=True),
        **RUN_OPTIONS,
    )

    model: str
    recipe: dict[str, Any]
    run_dir: str
    resume: bool = False
    hafa_options: dict[str, Any] = field(default_factory=dict)  # the HAFA options chosen (ignored by baselines)
    amp: str = "none"
    workers: int = 2
    device: str | None = None
    keep: str = "both"
    compile: str | None = None  # torch.compile mode of the network (None: eager)

    @classmethod
    def from_saved(cls: type[Settings], values: Any, where: str) -> Settings:
        """Settings saved in a checkpoint, read through the command line's checks: no field unknown or
        missing, each of its type and range, then `check` (the recipe, the run options, the HAFA
        options). A SettingError names `where` (e.g. 'best.pth: settings'), the field and the value."""
        if not isinstance(values, dict):
            raise SettingError(f"{where} must be a mapping of settings, not {shown(values)}")
        declared = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(declared), key=str)
        if unknown:
            raise SettingError(f"{where} has unknown fields: {', '.join(map(shown, unknown))}")
        required = [name for name, f in declared.items() if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise SettingError(f"{where} lacks {', '.join(missing)}")
        checked = {name: cls.FIELDS[name].check(value, f"{where}.{name}") for name, value in values.items()}
        return cls(**checked).check(where)

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self: Settings, where: str | None = None) -> Settings:
        """Every setting allowed: the recipe (each key's type and range, and the rules between keys),
        the run options and the HAFA options. -> self, with values in their settings' types and `hafa`,
        the HafaOptions that hafa_options make. where:
        what the messages name (settings read back from a file), else the command line's names."""
        prefix = "" if where is None else f"{where}."
        if where is None:
            self.recipe = self.RECIPE.check(self.recipe, "recipe setting")
        else:
            self.recipe = self.RECIPE.check(self.recipe, f"{where}.recipe", name_relations=True)
        for name, setting in RUN_OPTIONS.items():
            setattr(self, name, setting.check(getattr(self, name), prefix + name))
        self.hafa = HafaOptions.of(self.hafa_options, where="" if where is None else f"{where}.hafa_options")
        return self


@dataclass(kw_only=True)
class ClassificationSettings(RunSettings):
    RECIPE = CLASSIFICATION_RECIPE
    FIELDS: ClassVar[dict[str, Setting]] = dict(
        RunSettings.FIELDS,
        data=_text("a folder"),
        init_from=_text("a checkpoint file", optional=True),
        num_classes=Whole(None, low=1, optional=True),
        grad_checkpointing=Flag(),
        sync_bn=Flag(),
    )

    data: str  # ROOT with ROOT/{train,val}/<class>/<image>
    init_from: str | None = None
    num_classes: int | None = None  # checked against the data's class count when given
    grad_checkpointing: bool = False
    sync_bn: bool = False


@dataclass(kw_only=True)
class SegmentationSettings(RunSettings):
    RECIPE = SEGMENTATION_RECIPE
    FIELDS: ClassVar[dict[str, Setting]] = dict(
        RunSettings.FIELDS,
        data=SegmentationData(),
        num_classes=Whole(None, low=1),
        reduce_zero_label=Flag(),
        class_names=Values(None, item=Text(), min_length=1),
        ignore_index=Whole(IGNORE_INDEX, low=0, high=65535, note="a mask value"),
        backbone_checkpoint=_text("a checkpoint file", optional=True),
        sync_bn=Flag(),
        norm_eval=Flag(),
    )

    data: dict[str, Any]  # as hafa.data.segmentation.data_pairs takes it: the ADE20K layout or folder pairs
    num_classes: int
    reduce_zero_label: bool  # the masks' label convention: 0 ignored, v -> class v - 1
    class_names: list[str]
    ignore_index: int = IGNORE_INDEX  # the mask value every layout ignores
    backbone_checkpoint: str | None = None
    sync_bn: bool = True
    norm_eval: bool = False


@dataclass(kw_only=True)
class DetectionSettings(RunSettings):
    RECIPE = DETECTION_RECIPE
    FIELDS: ClassVar[dict[str, Setting]] = dict(
        RunSettings.FIELDS,
        data=_text("a folder"),
        train_split=_text("a split name (a folder's name: letters, digits, '.', '_', '-')", valid=_split_name),
        val_split=_text("a split name (a folder's name: letters, digits, '.', '_', '-')", valid=_split_name),
        init_from=_text("a checkpoint file", optional=True),
        sync_bn=Flag(),
        norm_eval=Flag(),
        size_buckets=Flag(),
        category_ids=Values(None, item=Whole()),
    )

    data: str  # COCO ROOT
    train_split: str
    val_split: str
    init_from: str | None = None
    sync_bn: bool = True
    norm_eval: bool = False
    # batches padded to a few sizes (hafa.models.mask_rcnn.side_buckets) instead of multiples of 32: what a
    # compiled backbone needs (one graph per size); on for runs started with --compile
    size_buckets: bool = False
    category_ids: list[int] = field(default_factory=list)  # the training json's, in class order


# Each task's settings, as a checkpoint's task names them.
TASK_SETTINGS: dict[str, type[RunSettings]] = dict(
    classification=ClassificationSettings, segmentation=SegmentationSettings, detection=DetectionSettings
)
