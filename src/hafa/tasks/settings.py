"""The settings of a training run, one dataclass per task, and each task's recipe: every recipe key with
its type, range and default (the shipped recipe files and `--set` override them), and the rules
between keys. A run's settings are built once from the recipe and the options, checked (`check`),
saved in the checkpoint (as a dict) and read back from it by the commands that evaluate or predict."""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from timm.optim import list_optimizers

from ..data.segmentation import IGNORE_INDEX
from ..models._base import HAFA_OPTIONS
from ..spec import Choice, Flag, Number, RecipeSpec, Relation, Setting, SettingError, Text, Values, Whole
from .options import image_side

Settings = TypeVar("Settings", bound="RunSettings")


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
    [Relation(("warmup_epochs", "epochs"), lambda w, e: w <= e, "the warm-up cannot be longer than the run")],
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
        Relation(("warmup_iterations", "iterations"), lambda w, i: w <= i, "the warm-up cannot be longer than the run"),
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
        fpn_channels=Whole(256, low=1),
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


@dataclass(kw_only=True)
class RunSettings:
    """What every training run is: a model on data with a recipe (the task's recipe settings, checked
    against its spec), in a run folder."""

    RECIPE = RecipeSpec({})

    model: str
    recipe: dict[str, Any]
    run_dir: str
    resume: bool = False
    hafa_options: dict[str, Any] = field(default_factory=dict)  # HAFA constructor options (ignored by baselines)
    amp: str = "none"
    workers: int = 2
    device: str | None = None
    keep: str = "both"
    compile: str | None = None  # torch.compile mode of the network (None: eager)

    @classmethod
    def from_dict(cls: type[Settings], values: dict) -> Settings:
        """Settings saved in a checkpoint (keys this version does not know are left out; not checked:
        a checkpoint is read as it was trained)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self: Settings) -> Settings:
        """Every setting allowed: the recipe (each key's type and range, and the rules between keys),
        the run options and the HAFA options. -> self, with values in their settings' types."""
        self.recipe = self.RECIPE.check(self.recipe, "recipe setting")
        for name, setting in RUN_OPTIONS.items():
            setattr(self, name, setting.check(getattr(self, name), name))
        unknown = sorted(set(self.hafa_options) - set(HAFA_OPTIONS))
        if unknown:
            raise SettingError(f"unknown HAFA options: {', '.join(unknown)} (known: {', '.join(HAFA_OPTIONS)})")
        for name, value in self.hafa_options.items():
            HAFA_OPTIONS[name].check(list(value) if isinstance(value, tuple) else value, name)
        return self


@dataclass(kw_only=True)
class ClassificationSettings(RunSettings):
    RECIPE = CLASSIFICATION_RECIPE

    data: str  # ROOT with ROOT/{train,val}/<class>/<image>
    init_from: str | None = None
    num_classes: int | None = None  # checked against the data's class count when given
    grad_checkpointing: bool = False
    sync_bn: bool = False


@dataclass(kw_only=True)
class SegmentationSettings(RunSettings):
    RECIPE = SEGMENTATION_RECIPE

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
