"""Object detection and instance segmentation: `hafa det-train` and `hafa det-eval`.

Mask R-CNN with an FPN on a HAFA or baseline backbone (torchvision's model), trained with the
paper's COCO 1x recipe (mmdetection's schedule): AdamW, lr 1e-4 at a batch of 16, weight decay
1e-4, 12 epochs, lr x0.1 after epochs 8 and 11, a linear warm-up over 500 iterations, images
resized to a shorter side of 800 (longer at most 1333), horizontal flips, the backbone initialised
from an ImageNet checkpoint (--init-from). Box and mask AP from COCOeval after every epoch. One
process, or several with `torchrun --nproc_per_node=N -m hafa det-train ...`. Without --data, the
embedded scenes train a HAFA model and its baseline with a short recipe, side by side.
"""

import argparse
import logging
import math
import os

import torch
from timm.scheduler import MultiStepLRScheduler
from torch import nn

from ..checkpoint import Checkpoint
from ..compiled import compile_network
from ..data.checks import check_coco
from ..data.coco import CocoInstances, collate_detection, find_split
from ..data.folder import read_rgb
from ..data.scenes import prepare_scenes
from ..errors import UserError
from ..models.common import SMALLEST_INPUT
from ..models.mask_rcnn import side_buckets
from ..pretrained import load_pretrained
from ..spec import Whole, add_json_option, add_setting
from .arguments import (
    add_recipe_and_run_options,
    add_recipe_file_option,
    add_run_options,
    add_training_options,
    norm_eval,
)
from .detection_metrics import METRICS, evaluate_detection
from .drawing import PALETTE, shrink_to_draw
from .job import evaluate_and_report, prepare_on_main, train_command
from .networks import RCNN_OPTIONS, backbone_of, build_model, detector_arguments
from .processes import ProcessContext
from .run_log import baseline_pairs, format_metric
from .run_settings import DETECTION_RECIPE, DetectionSettings, image_side
from .saved import read_saved
from .task import Task, TrainingData

_logger = logging.getLogger("hafa")


class Detection(Task):
    """A Mask R-CNN on COCO json, trained with mmdetection's step schedule."""

    name = "detection"
    settings_class = DetectionSettings
    recipe_for_own_data = "coco_mask_rcnn_1x"
    recipe_for_embedded_data = "scenes_mask_rcnn"
    recipe_options = ("epochs", "min_size", "max_size", "warmup_iters", "clip_grad")
    network_kind = "backbone"
    dense = True
    score = "bbox_AP"
    curves = {
        "loss": ["train_loss"],
        "box AP (%)": ["val_bbox_AP", "val_bbox_AP50", "val_bbox_AP75"],
        "mask AP (%)": ["val_segm_AP", "val_segm_AP50", "val_segm_AP75"],
    }

    def settings_from_options(self, args) -> dict:
        return dict(
            data=args.data,
            train_split=args.train_split,
            val_split=args.val_split,
            init_from=args.init_from,
            sync_bn=args.sync_bn,
            norm_eval=norm_eval(args, args.init_from),
            size_buckets=args.compile is not None,
        )

    def uses_embedded_data(self, chosen: dict) -> bool:
        return chosen["data"] is None

    def prepare_data(self, chosen: dict, processes: ProcessContext, check_files: bool) -> dict:
        """The data and its splits (--train-split / --val-split, else train and val, or train2017 and val2017)."""
        data = chosen["data"]
        if data is None:
            data = prepare_on_main(default_data, processes)
            if processes.is_main:
                print(f"data: the embedded scenes (48 train / 16 val images, COCO json) in {data}")
        data = os.path.abspath(data)
        splits = dict(
            train_split=chosen["train_split"] or find_split(data, "train"),
            val_split=chosen["val_split"] or find_split(data, "val"),
        )
        if check_files:
            check_coco(data, [splits["train_split"], splits["val_split"]], progress=processes.is_main)
        return dict(chosen, data=data, **splits)

    def datasets(self, settings: DetectionSettings, processes: ProcessContext) -> TrainingData:
        """The COCO splits (the training images without annotations left out unless filter_empty is off),
        and the category ids the checkpoint records in class order."""
        recipe = settings.recipe
        train_set = CocoInstances(
            settings.data,
            settings.train_split,
            train=True,
            hflip=recipe["hflip"],
            filter_empty=recipe["filter_empty"],
            seed=recipe["seed"],
        )
        val_set = CocoInstances(settings.data, settings.val_split, train=False, categories=train_set.categories)
        if processes.is_main:
            for message in train_set.dropped.messages(recipe["filter_empty"]):
                _logger.warning("%s: %s", train_set.path, message)
        return TrainingData(
            train=train_set,
            val=val_set,
            collate=collate_detection,
            classes=train_set.class_names,
            sample_names=[train_set.coco.imgs[i]["file_name"] for i in train_set.image_ids],
            found_settings=dict(category_ids=train_set.category_ids),
        )

    def network_arguments(self, settings: DetectionSettings, data: TrainingData) -> dict:
        recipe = settings.recipe
        return detector_arguments(
            settings.model,
            num_classes=len(data.classes),
            options=settings.hafa,
            drop_path_rate=recipe["drop_path"],
            fpn_channels=recipe["fpn_channels"],
            rcnn={k: recipe[k] for k in RCNN_OPTIONS},
        )

    def prepare_network(self, network, settings: DetectionSettings, processes: ProcessContext) -> None:
        """Batches padded as the settings say; the backbone started from --init-from (hafa.load_pretrained)."""
        use_size_buckets(network, settings.size_buckets)
        if settings.init_from:
            load_pretrained(backbone_of(self.name, network), settings.init_from, verbose=processes.is_main)

    def compiled_part(self, network: nn.Module) -> nn.Module:
        return network.backbone

    def scheduler(
        self, optimizer: torch.optim.Optimizer, recipe: dict, *, updates_per_epoch: int, epochs: int
    ) -> MultiStepLRScheduler:
        """mmdetection's step schedule, stepped every update: lr rises linearly from warmup_ratio * lr over
        the first warmup_iters updates, then is multiplied by lr_step_rate after each epoch in lr_steps."""
        lr = optimizer.param_groups[0]["lr"]
        # timm applies milestone m from schedule index m - 1, and index u - 1 sets the lr of update u:
        # the first update of epoch e + 1 is update e * updates_per_epoch + 1.
        return MultiStepLRScheduler(
            optimizer,
            decay_t=[e * updates_per_epoch + 1 for e in recipe["lr_steps"]],
            decay_rate=recipe["lr_step_rate"],
            warmup_t=recipe["warmup_iters"],
            warmup_lr_init=lr * recipe["warmup_ratio"],
            warmup_prefix=False,
            t_in_epochs=False,
        )

    def loss(self, settings: DetectionSettings, data: TrainingData, device: torch.device):
        """The sum of Mask R-CNN's losses on a batch of images of any sizes and their targets."""

        def loss(network, batch):
            images, targets, skipped = batch
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [
                {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets
            ]
            return sum(network(images, targets).values()), len(images), skipped

        return loss

    def evaluate(self, network, data: TrainingData, settings: DetectionSettings, processes: ProcessContext):
        return evaluate_detection(
            network, data.val, settings.recipe["eval_batch_size"], settings.workers, processes, settings.amp
        )

    def curves_note(self, recipe: dict) -> str:
        return (
            "train loss: the sum of Mask R-CNN's losses (proposals, classes, boxes, masks) on the training "
            "images; validation: COCO box and mask AP"
        )

    def print_summary(self, results: list[dict]) -> None:
        """The best epoch's box and mask AP of each model, and each HAFA model against its baseline."""
        print(
            "\n| model | box AP | AP50 | AP75 | APs | APm | APl | mask AP | AP50 | AP75 | APs | APm | APl | at epoch |"
        )
        print("|---|" + "---:|" * 13)
        best = {r["model"]: r["best_metrics"] for r in results if r["best_epoch"] > 0}
        for r in results:
            if r["model"] in best:
                cells = " | ".join(
                    format_metric(key, best[r["model"]][key] if best[r["model"]][key] is not None else math.nan).rstrip(
                        "%"
                    )
                    for key in (f"{kind}_{name}" for kind in ("bbox", "segm") for name in METRICS)
                )
                print(f"| {r['model']} | {cells} | {r['best_epoch']} |")
        for hafa, base in baseline_pairs(results):
            ours, theirs = best[hafa["model"]], best[base["model"]]
            print(
                f"{hafa['model']} vs {base['model']}: {ours['bbox_AP'] - theirs['bbox_AP']:+.1f} box AP, "
                f"{ours['segm_AP'] - theirs['segm_AP']:+.1f} mask AP"
            )
        for r in results:
            print(f"{r['model']}: best checkpoint {r['best_checkpoint'] or '(not kept)'}, curves {r['curves']}")


TASK = Detection()


def default_data() -> str:
    return os.path.join(prepare_scenes(), "coco")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_options(parser, __doc__, TASK)
    parser.add_argument(
        "--data",
        help="COCO ROOT with ROOT/annotations/instances_{train,val}[2017].json and "
        "ROOT/{train,val}[2017]/ (default: the embedded scenes)",
    )
    parser.add_argument("--train-split", help="default: train, else train2017")
    parser.add_argument("--val-split", help="default: val, else val2017")
    add_recipe_file_option(parser, TASK)
    parser.add_argument(
        "--init-from",
        metavar="CKPT",
        help="backbone weights from an ImageNet checkpoint (baseline or HAFA; hafa.load_pretrained)",
    )
    add_recipe_and_run_options(
        parser,
        TASK,
        "lr_steps=[16,22] filter_empty=false",
        min_size=dict(help="shorter image side"),
        max_size=dict(help="longest image side"),
    )


def run_train(args) -> int:
    return train_command(TASK, args)


def use_size_buckets(model: nn.Module, enabled: bool) -> None:
    """Pad batches to size buckets (or to multiples of 32), and say which sizes."""
    model.size_buckets = enabled
    if enabled:
        sides = side_buckets(min(model.transform.min_size), model.transform.max_size)
        _logger.info("batches padded to size buckets: sides %s (then multiples of 32)", ", ".join(map(str, sides)))


def load_detector(
    path: str, command: str, image_sizes: dict | None = None, size_buckets: bool | None = None
) -> tuple[nn.Module, Checkpoint]:
    """The exact Mask R-CNN of a det-train checkpoint, in eval mode, and the checkpoint; image_sizes:
    min_size / max_size to resize to instead of the recipe's (they change the inputs, not the weights);
    size_buckets: pad batches to size buckets or not (default: as the run that wrote the checkpoint)."""
    saved = read_saved(path, "detection", command)
    model = build_model(saved)
    for key, value in (image_sizes or {}).items():
        setattr(model.transform, key, (value,) if key == "min_size" else value)
    if size_buckets is None:
        size_buckets = saved.settings["size_buckets"]  # checked, its default filled in (check_saved)
    use_size_buckets(model, size_buckets)
    return model, saved


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="best.pth / last.pth of hafa det-train")
    parser.add_argument("--data", help="COCO ROOT (default: the checkpoint's training data)")
    parser.add_argument("--split", help="default: val, else val2017 (the checkpoint's validation split)")
    add_setting(
        parser,
        "--batch-size",
        setting=Whole(None, low=1, optional=True),
        help="images per batch (default: the recipe's eval_batch_size; "
        "batches are padded, so it can change the result slightly)",
    )
    for key, side in (("min_size", "shorter"), ("max_size", "longest")):
        add_setting(
            parser,
            f"--{key.replace('_', '-')}",
            setting=image_side(optional=True),
            help=f"{side} image side (default: the checkpoint's recipe)",
        )
    parser.add_argument(
        "--size-buckets",
        action=argparse.BooleanOptionalAction,
        help="pad batches to a few sizes (what --compile needs: one graph per size) instead of multiples of 32 "
        "(default: as the checkpoint's run, which used them when it was compiled)",
    )
    add_json_option(parser, "the metrics")
    add_run_options(parser)


def run_eval(args) -> int:
    return evaluate_and_report(args, _evaluate_checkpoint, _print_metrics)


def _print_metrics(metrics: dict) -> None:
    print(
        f"{metrics['model']} on {metrics['data']} ({metrics['images']} images"
        + (f", {metrics['skipped']} unreadable skipped):" if metrics["skipped"] else "):")
    )
    for kind, title in (("bbox", "box "), ("segm", "mask")):
        print(f"  {title} " + "  ".join(f"{name} {format_metric(name, metrics[f'{kind}_{name}'])}" for name in METRICS))


def _evaluate_checkpoint(args, processes: ProcessContext) -> dict:
    overrides = {k: getattr(args, k) for k in ("min_size", "max_size") if getattr(args, k) is not None}
    model, saved = load_detector(args.checkpoint, "hafa det-eval", overrides, args.size_buckets)
    settings = DetectionSettings.from_saved(saved.settings, f"{args.checkpoint}: settings")
    DETECTION_RECIPE.check_relations({**settings.recipe, **overrides})
    data = args.data or settings.data
    if args.data is None and not os.path.isdir(data) and data.endswith(os.path.join("scenes", "coco")):
        data = default_data()  # the embedded scenes, written again after the cache was cleared
    split = args.split or (settings.val_split if args.data is None else find_split(data, "val"))
    categories = list(zip(settings.category_ids, saved.classes))
    dataset = CocoInstances(data, split, train=False, categories=categories)
    model.to(processes.device)
    compile_network(model.backbone, args.compile, name=settings.model)
    batch_size = args.batch_size or settings.recipe["eval_batch_size"]
    metrics = evaluate_detection(model, dataset, batch_size, args.workers, processes, args.amp)
    return dict(metrics, model=saved.model_name, data=data, split=split, checkpoint=args.checkpoint)


@torch.no_grad()
def predict_detection(
    checkpoint: str, image_path: str, output_png: str, score_threshold: float = 0.5, device: str = "cpu"
) -> dict:
    """Detect in one image with a det-train checkpoint and write it as a PNG with the boxes, class names,
    scores and masks (> 0.5) drawn (a huge image at most DRAW_LONG_SIDE pixels on its longer side).
    -> dict(output, detections: [(class name, score, [x1, y1, x2, y2] in the image's pixels)])."""
    from torchvision.transforms.v2 import functional as TF
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    model, saved = load_detector(checkpoint, "hafa predict")
    image = read_rgb(image_path)
    if image is None:
        raise UserError(f"cannot read image {image_path}")
    image, scale = shrink_to_draw(image)
    pixels = TF.pil_to_tensor(image)
    height, width = pixels.shape[-2:]
    # The detector resizes the longer side to at most max_size: a very thin image would shrink below
    # what the backbone takes, so its shorter side is padded (black, bottom or right) and cut off again.
    shortest = math.ceil(max(height, width) * SMALLEST_INPUT / model.transform.max_size)
    padded = (
        TF.pad(pixels, [0, 0, max(0, shortest - width), max(0, shortest - height)])
        if min(height, width) < shortest
        else pixels
    )
    detection = model.to(device)([TF.to_dtype(padded, torch.float32, scale=True).to(device)])[0]
    keep = detection["scores"] >= score_threshold
    boxes, labels, scores = (detection[key][keep].cpu() for key in ("boxes", "labels", "scores"))
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(max=width), boxes[:, 1::2].clamp(max=height)
    masks = detection["masks"][keep, 0, :height, :width].cpu() > 0.5
    names = [saved.classes[label - 1] for label in labels.tolist()]
    colors = [PALETTE[(label - 1) % len(PALETTE)] for label in labels.tolist()]
    drawn = pixels
    if len(boxes):
        drawn = draw_segmentation_masks(drawn, masks, alpha=0.45, colors=colors)
        drawn = draw_bounding_boxes(
            drawn, boxes, labels=[f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())], colors=colors, width=2
        )
    os.makedirs(os.path.dirname(os.path.abspath(output_png)), exist_ok=True)
    TF.to_pil_image(drawn).save(output_png, format="PNG")
    boxes = (boxes / scale).tolist()
    return dict(output=output_png, detections=[(n, s, b) for n, s, b in zip(names, scores.tolist(), boxes)])
