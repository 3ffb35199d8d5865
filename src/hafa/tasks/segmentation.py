"""Semantic segmentation: `hafa seg-train` and `hafa seg-eval` (Semantic FPN on a HAFA or baseline backbone).

The paper's ADE20K recipe (configs/ade20k_semantic_fpn.yaml): AdamW, poly decay over 40k iterations at a
global batch of 16, random rescale / crop 512 / flip / photometric jitter, whole-image evaluation with
the short side at 512 (sliding windows as an option); mIoU, mean class accuracy, pixel accuracy and
per-class IoU. One process, or several with `torchrun --nproc_per_node=N -m hafa seg-train ...`.
Without data options the embedded scenes train a HAFA model and its baseline side by side.

Data: --data ROOT in the ADE20K layout (ROOT/images/{training,validation}, ROOT/annotations/...;
mask value 0 ignored, 1..K -> classes 0..K-1), or --images DIR --masks DIR --val-images DIR
--val-masks DIR with masks holding the classes 0..K-1 (255 = ignore).
"""

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import PolyLRScheduler
from torch import nn

from ..compiled import compile_network
from ..data.checks import check_segmentation_pairs
from ..data.folder import read_rgb
from ..data.scenes import SEGMENTATION_CLASSES, default_scenes_root, prepare_scenes
from ..data.segmentation import (
    IGNORE_INDEX,
    EvalTransform,
    LabelMapping,
    SegmentationDataset,
    TrainTransform,
    collate_segmentation,
    data_pairs,
)
from ..errors import UserError
from ..pretrained import load_pretrained
from ..spec import Choice, Whole, add_json_option, add_setting
from .arguments import (
    add_recipe_and_run_options,
    add_recipe_file_option,
    add_run_options,
    add_training_options,
    norm_eval,
)
from .drawing import draw_segmentation, shrink_to_draw
from .job import evaluate_and_report, prepare_on_main, train_command
from .networks import backbone_of, build_model, segmenter_arguments
from .processes import ProcessContext
from .run_settings import SegmentationSettings
from .sampling import EpochSampler
from .saved import read_saved
from .segmentation_metrics import evaluate_segmentation, infer_logits
from .task import Task, TrainingData

ADE20K_CLASSES = 150
NUM_CLASSES = Whole(None, low=1, high=IGNORE_INDEX, optional=True)
EVAL_MODE = Choice(None, choices=("whole", "slide"), optional=True)


class Segmentation(Task):
    """A Semantic FPN on masks in the ADE20K layout or in image / mask folder pairs, trained for a number
    of iterations (rounded to whole epochs)."""

    name = "segmentation"
    settings_class = SegmentationSettings
    recipe_for_own_data = "ade20k_semantic_fpn"
    recipe_for_embedded_data = "scenes_semantic_fpn"
    recipe_options = ("iterations", "crop_size", "eval_mode")
    network_kind = "backbone"
    dense = True
    score = "mIoU"
    score_name = "mIoU"
    curves = {"loss": ["train_loss"], "validation (%)": ["val_mIoU", "val_mAcc", "val_aAcc"]}
    length_option = "--iterations"

    def settings_from_options(self, args) -> dict:
        return dict(
            **_data_from_args(args),
            backbone_checkpoint=args.backbone_checkpoint,
            sync_bn=args.sync_bn,
            norm_eval=norm_eval(args, args.backbone_checkpoint),
        )

    def uses_embedded_data(self, chosen: dict) -> bool:
        return _is_scenes(chosen["data"])

    def prepare_data(self, chosen: dict, processes: ProcessContext, check_files: bool) -> dict:
        _ensure_scenes(chosen["data"], processes)
        if processes.is_main and self.uses_embedded_data(chosen):
            print(f"data: the embedded scenes ({', '.join(SEGMENTATION_CLASSES)}) in {chosen['data']['root']}")
        if check_files:
            check_segmentation_pairs(
                chosen["data"], chosen["num_classes"], chosen["reduce_zero_label"], progress=processes.is_main
            )
        return chosen

    def epochs(self, recipe: dict, batches_per_epoch: int) -> int:
        return max(1, round(recipe["iterations"] / batches_per_epoch))

    def datasets(self, settings: SegmentationSettings, processes: ProcessContext) -> TrainingData:
        recipe = settings.recipe
        labels = LabelMapping(settings.num_classes, settings.reduce_zero_label)
        train_set = SegmentationDataset(
            data_pairs(settings.data, "train"),
            TrainTransform(recipe),
            labels,
            replace_unreadable=True,
            seed=recipe["seed"],
        )
        val_set = SegmentationDataset(data_pairs(settings.data, "val"), EvalTransform(recipe), labels)
        return TrainingData(
            train=train_set,
            val=val_set,
            collate=collate_segmentation,
            classes=settings.class_names,
            sample_names=[image for image, _ in train_set.pairs],
        )

    def network_arguments(self, settings: SegmentationSettings, data: TrainingData) -> dict:
        return segmenter_arguments(
            settings.model,
            num_classes=settings.num_classes,
            options=settings.hafa,
            drop_path_rate=settings.recipe["drop_path"],
            dropout=settings.recipe["head_dropout"],
        )

    def starting_checkpoint(self, settings: SegmentationSettings) -> str | None:
        return settings.backbone_checkpoint

    def prepare_network(self, network, settings: SegmentationSettings, processes: ProcessContext) -> None:
        """Start the backbone from --backbone-checkpoint (hafa.load_pretrained)."""
        if settings.backbone_checkpoint:
            load_pretrained(backbone_of(self.name, network), settings.backbone_checkpoint, verbose=processes.is_main)

    def scheduler(
        self, optimizer: torch.optim.Optimizer, recipe: dict, *, updates_per_epoch: int, epochs: int
    ) -> PolyLRScheduler:
        """Poly decay over the run's iterations, lr = min_lr + (lr - min_lr) * (1 - t / total) ** poly_power,
        stepped every iteration (after a linear warm-up from warmup_lr over warmup_iterations, when there
        is one)."""
        return PolyLRScheduler(
            optimizer,
            t_initial=epochs * updates_per_epoch,
            power=recipe["poly_power"],
            lr_min=recipe["min_lr"],
            warmup_t=recipe["warmup_iterations"],
            warmup_lr_init=recipe["warmup_lr"],
            t_in_epochs=False,
        )

    def loss(self, settings: SegmentationSettings, data: TrainingData, device: torch.device):
        def loss(network, batch):
            batch.check()
            images = batch.images.to(device, non_blocking=True)
            targets = batch.labels.to(device, non_blocking=True)
            return segmentation_loss(network(images), targets), images.shape[0], batch.skipped

        return loss

    def evaluate(self, network, data: TrainingData, settings: SegmentationSettings, processes: ProcessContext):
        return evaluate_with_recipe(
            network, data.val, settings.class_names, settings.recipe, processes, settings.workers, settings.amp
        )

    def curves_note(self, recipe: dict) -> str:
        return (
            "train loss: cross-entropy on random crops of the training images; validation: mIoU, mean class "
            "accuracy and pixel accuracy on the validation images"
        )

    def start_message(self, settings: SegmentationSettings, data: TrainingData, sampler: EpochSampler, epochs: int):
        """What the recipe's iterations became."""
        return (
            f"{settings.model}: {len(data.train)} training / {len(data.val)} validation images, "
            f"{epochs} epochs of {sampler.batches_per_epoch()} iterations at a global batch of {sampler.global_batch}"
        )


TASK = Segmentation()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels; 0 (with gradients) when a batch has none."""
    labelled = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / labelled


def evaluate_with_recipe(
    network, dataset, class_names: list[str], recipe: dict, processes: ProcessContext, workers: int, amp: str
) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU with the recipe's evaluation mode (whole image or windows)."""
    return evaluate_segmentation(
        network,
        dataset,
        class_names,
        processes,
        workers,
        amp,
        recipe["eval_mode"],
        recipe["eval_crop"],
        recipe["eval_stride"],
    )


def _add_data_options(parser, training: bool) -> None:
    split = "training " if training else ""
    group = parser.add_argument_group(
        "data (default: the embedded scenes)" if training else "data (default: the checkpoint's validation data)"
    )
    group.add_argument(
        "--data",
        metavar="ROOT",
        help="ADE20K layout: ROOT/images/{training,validation}/*.jpg, ROOT/annotations/{training,validation}/*.png",
    )
    group.add_argument("--images", metavar="DIR", help=f"{split}images (with --masks); masks match by file name")
    group.add_argument("--masks", metavar="DIR", help=f"{split}masks: one class id per pixel, 255 = ignore")
    if training:
        group.add_argument("--val-images", metavar="DIR", help="validation images (with --images)")
        group.add_argument("--val-masks", metavar="DIR", help="validation masks (with --images)")
        add_setting(
            group,
            "--num-classes",
            setting=NUM_CLASSES,
            help=f"classes (default {ADE20K_CLASSES} with --data; needed with --images)",
        )
        group.add_argument("--class-names", metavar="FILE", help="class names, one a line (for logs and legends)")
    group.add_argument(
        "--reduce-zero-label",
        action=argparse.BooleanOptionalAction,
        help="the masks' convention: value 0 = ignore and v -> class v-1, or (--no-) values 0..K-1 are the classes "
        + (
            "(default: on with --data, off with --images)"
            if training
            else "(default: the checkpoint's, for masks in its training layout; say it for masks in the other layout)"
        ),
    )


def _data_from_args(args) -> dict:
    """-> dict(data, num_classes, reduce_zero_label, class_names) for seg-train."""
    folders = [args.images, args.masks, args.val_images, args.val_masks]
    if any(folders):
        if args.data or not all(folders):
            raise UserError(
                "give either --data ROOT (ADE20K layout) or all of --images, --masks, --val-images and --val-masks"
            )
        if args.num_classes is None:
            raise UserError("with --images / --masks, say how many classes the masks hold with --num-classes")
        data = dict(
            layout="folders",
            train=[os.path.abspath(args.images), os.path.abspath(args.masks)],
            val=[os.path.abspath(args.val_images), os.path.abspath(args.val_masks)],
        )
        num_classes, reduce_zero_label, names = args.num_classes, bool(args.reduce_zero_label), None
    elif args.data:
        data = dict(layout="ade20k", root=os.path.abspath(args.data))
        num_classes = args.num_classes or ADE20K_CLASSES
        reduce_zero_label = args.reduce_zero_label is not False
        names = None
    else:
        data = dict(layout="ade20k", root=os.path.join(default_scenes_root(), "ade"))
        num_classes, reduce_zero_label, names = len(SEGMENTATION_CLASSES), True, list(SEGMENTATION_CLASSES)
        if args.num_classes not in (None, num_classes) or args.reduce_zero_label is False:
            raise UserError(
                f"the embedded scenes have {num_classes} classes in the ADE20K convention; "
                "--num-classes and --no-reduce-zero-label are for your own data"
            )
    if args.class_names:
        names = _read_class_names(args.class_names, num_classes)
    return dict(
        data=data,
        num_classes=num_classes,
        reduce_zero_label=reduce_zero_label,
        class_names=names or [f"class_{i}" for i in range(num_classes)],
    )


def _read_class_names(path: str, num_classes: int) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"class names file not found: {path}")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != num_classes:
        raise UserError(f"{path} names {len(names)} classes, but there are {num_classes}")
    return names


def _is_scenes(data: dict) -> bool:
    return data["layout"] == "ade20k" and data["root"] == os.path.join(default_scenes_root(), "ade")


def _ensure_scenes(data: dict, processes: ProcessContext) -> None:
    """Write the embedded scenes when they are the data and not there yet."""
    if _is_scenes(data):
        prepare_on_main(prepare_scenes, processes)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_options(parser, __doc__, TASK)
    _add_data_options(parser, training=True)
    add_recipe_file_option(parser, TASK, "data options")
    parser.add_argument(
        "--backbone-checkpoint",
        "--init-from",
        dest="backbone_checkpoint",
        metavar="CKPT",
        help="start the backbone from an ImageNet checkpoint (timm / official / hafa train)",
    )
    add_recipe_and_run_options(parser, TASK, "scale=[1024,256]", crop_size=dict(metavar=("H", "W")))


def run_train(args) -> int:
    return train_command(TASK, args)


def load_segmenter(checkpoint: str, command: str) -> tuple[nn.Module, SegmentationSettings]:
    """A `hafa seg-train` checkpoint -> (its exact SemanticFPN in eval mode on the CPU, its training settings)."""
    saved = read_saved(checkpoint, "segmentation", command)
    return build_model(saved), SegmentationSettings.from_saved(saved.settings, f"{checkpoint}: settings")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="best.pth / last.pth of hafa seg-train")
    _add_data_options(parser, training=False)
    add_setting(parser, "--eval-mode", setting=EVAL_MODE, help="default: the checkpoint's recipe")
    add_json_option(parser, "the metrics")
    add_run_options(parser)


def run_eval(args) -> int:
    return evaluate_and_report(args, _evaluate_checkpoint, _print_metrics, _json_values)


def _json_values(metrics: dict) -> dict:
    """null for a class neither in the ground truth nor predicted."""
    per_class = {k: None if np.isnan(v) else v for k, v in metrics["per_class_IoU"].items()}
    return dict(metrics, per_class_IoU=per_class)


def _evaluate_checkpoint(args, processes: ProcessContext) -> dict:
    model, settings = load_segmenter(args.checkpoint, "hafa seg-eval")
    if args.data and (args.images or args.masks):
        raise UserError("give either --data ROOT or --images DIR --masks DIR")
    if args.images or args.masks:
        if not (args.images and args.masks):
            raise UserError("--images and --masks go together")
        data = dict(layout="folders", val=[os.path.abspath(args.images), os.path.abspath(args.masks)])
    elif args.data:
        data = dict(layout="ade20k", root=os.path.abspath(args.data))
    else:
        data = settings.data
        _ensure_scenes(data, processes)
    reduce_zero_label = label_convention(settings, data["layout"], args.reduce_zero_label, args.checkpoint)
    labels = LabelMapping(settings.num_classes, reduce_zero_label)
    dataset = SegmentationDataset(data_pairs(data, "val"), EvalTransform(settings.recipe), labels)
    recipe = dict(settings.recipe, eval_mode=args.eval_mode or settings.recipe["eval_mode"])
    model.to(processes.device)
    compile_network(model, args.compile, name=settings.model)
    metrics = evaluate_with_recipe(model, dataset, settings.class_names, recipe, processes, args.workers, args.amp)
    return dict(metrics, model=settings.model, data=data, checkpoint=args.checkpoint, eval_mode=recipe["eval_mode"])


LAYOUTS = {"ade20k": "the ADE20K layout (--data)", "folders": "image / mask folder pairs (--images, --masks)"}


def _convention(reduce_zero_label: bool, num_classes: int) -> str:
    if reduce_zero_label:
        return f"reduce_zero_label (0 = ignore, values 1..{num_classes} = classes 0..{num_classes - 1})"
    return f"no reduce_zero_label (values 0..{num_classes - 1} = the classes)"


def label_convention(settings: SegmentationSettings, layout: str, asked: bool | None, checkpoint: str) -> bool:
    """The masks' convention for evaluating `checkpoint` on masks in `layout`: as asked; else the
    checkpoint's, for masks in the layout it was trained on; else refused (the convention of masks in
    another layout is not known, and a wrong one shifts every class: a plausible, wrong mIoU)."""
    if asked is not None:
        return asked
    trained_layout = settings.data["layout"]
    if layout == trained_layout:
        return settings.reduce_zero_label
    raise UserError(
        f"{checkpoint} was trained on masks in {LAYOUTS[trained_layout]} with "
        f"{_convention(settings.reduce_zero_label, settings.num_classes)}; these masks are in {LAYOUTS[layout]}: "
        "say which convention they use with --reduce-zero-label or --no-reduce-zero-label"
    )


def _print_metrics(metrics: dict) -> None:
    print(
        f"{metrics['model']} ({metrics['eval_mode']}): mIoU {metrics['mIoU']:.2f}%  mAcc {metrics['mAcc']:.2f}%  "
        f"pixel accuracy {metrics['aAcc']:.2f}%  ({metrics['images']} images"
        + (f", {metrics['skipped']} unreadable skipped)" if metrics["skipped"] else ")")
    )
    print("| class | IoU (%) |\n|---|---:|")
    for name, iou in metrics["per_class_IoU"].items():
        print(f"| {name} | {'-' if np.isnan(iou) else f'{iou:.2f}'} |")


@torch.no_grad()
def predict_segmentation(
    checkpoint: str,
    image_path: str,
    output_png: str,
    device: str = "cpu",
    eval_mode: str | None = None,
    alpha: float = 0.5,
) -> dict:
    """Segment one image with a `hafa seg-train` checkpoint and write the image with the classes
    tinted and a legend as a PNG (a huge image at most DRAW_LONG_SIDE pixels on its longer side).
    -> dict(output, labels [H, W] int64 array of the drawn image, class_shares {name: %})."""
    model, settings = load_segmenter(checkpoint, "hafa predict")
    image = read_rgb(image_path)
    if image is None:
        raise UserError(f"cannot read the image {image_path}")
    image, _ = shrink_to_draw(image)
    recipe = settings.recipe
    pixels = EvalTransform(recipe).image_tensor(image)
    model.to(device)
    logits = infer_logits(
        model, pixels[None].to(device), eval_mode or recipe["eval_mode"], recipe["eval_crop"], recipe["eval_stride"]
    )
    logits = F.interpolate(logits.float(), size=(image.height, image.width), mode="bilinear", align_corners=False)
    labels = logits.argmax(1)[0].cpu().numpy()
    draw_segmentation(image, labels, settings.class_names, alpha).save(output_png, format="PNG")
    shares = np.bincount(labels.ravel(), minlength=len(settings.class_names)) / labels.size
    return dict(
        output=output_png,
        labels=labels,
        class_shares={n: 100 * float(s) for n, s in zip(settings.class_names, shares) if s > 0},
    )
