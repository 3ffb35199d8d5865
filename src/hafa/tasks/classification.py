"""Image classification: `hafa train` and `hafa eval`.

The paper's recipe (Sec. 4.1) on timm's pipeline: RandAugment, random erasing, Mixup/CutMix, label
smoothing, AdamW, a cosine schedule with warm-up, stochastic depth. One process, or several with
`torchrun --nproc_per_node=N -m hafa train ...` (DistributedDataParallel). Without --data the
embedded MNIST-5k trains a HAFA model and its baseline with a short recipe, side by side.
"""

import argparse
import os

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2

from ..checkpoint import Checkpoint, check_model_options, check_task
from ..compiled import compile_network
from ..data.checks import check_image_folder
from ..data.folder import ImageFolderDataset, collate_skipping, read_rgb
from ..data.mnist import default_data_root, prepare_mnist5k
from ..errors import UserError
from ..layers import HafaOptions
from ..pretrained import load_pretrained
from ..spec import Whole, add_json_option, add_setting
from .arguments import (
    add_model_options,
    add_recipe_and_run_options,
    add_recipe_file_option,
    add_run_options,
    add_training_options,
    hafa_options_of,
)
from .classification_metrics import evaluate_classification
from .job import evaluate_and_report, prepare_on_main, train_command
from .networks import build_classifier_from_state_dict, build_model, classifier_arguments
from .processes import ProcessContext
from .run_settings import CLASSIFICATION_RECIPE, ClassificationSettings, image_side
from .saved import read_saved, read_saved_or_state_dict
from .task import Task, TrainingData

NUM_CLASSES = Whole(None, low=1, optional=True)


class Classification(Task):
    """A classifier on an image folder (ROOT/{train,val}/<class>/<image>), trained with the paper's recipe."""

    name = "classification"
    settings_class = ClassificationSettings
    recipe_for_own_data = "imagenet_hafa"
    recipe_for_embedded_data = "mnist_demo"
    recipe_options = ("epochs", "img_size", "warmup_epochs", "drop_path", "clip_grad")
    network_kind = "model"
    dense = False
    score = "top1"
    score_name = "top-1"
    curves = {"loss": ["train_loss", "val_loss"], "accuracy (%)": ["val_top1", "val_top5"]}

    def settings_from_options(self, args) -> dict:
        return dict(
            data=args.data,
            init_from=args.init_from,
            num_classes=args.num_classes,
            grad_checkpointing=args.grad_checkpointing,
            sync_bn=args.sync_bn,
        )

    def uses_embedded_data(self, chosen: dict) -> bool:
        return chosen["data"] is None

    def prepare_data(self, chosen: dict, processes: ProcessContext, check_files: bool) -> dict:
        data = chosen["data"]
        if data is None:
            data = prepare_on_main(prepare_mnist5k, processes)
            if processes.is_main:
                print(f"data: the embedded MNIST-5k (4,000 train / 1,000 val real digits) in {data}")
        if check_files:
            check_image_folder(data, progress=processes.is_main)
        return dict(chosen, data=os.path.abspath(data))

    def datasets(self, settings: ClassificationSettings, processes: ProcessContext) -> TrainingData:
        recipe = settings.recipe
        train_set = ImageFolderDataset(
            settings.data, "train", train_transform(recipe), replace_unreadable=True, seed=recipe["seed"]
        )
        val_set = ImageFolderDataset(settings.data, "val", eval_transform(recipe), classes=train_set.classes)
        classes = train_set.classes
        if settings.num_classes is not None and settings.num_classes != len(classes):
            raise UserError(f"--num-classes {settings.num_classes} but {settings.data} has {len(classes)} classes")
        return TrainingData(
            train=train_set,
            val=val_set,
            collate=collate_skipping,
            classes=classes,
            sample_names=[path for path, _ in train_set.samples],
        )

    def network_arguments(self, settings: ClassificationSettings, data: TrainingData) -> dict:
        return classifier_arguments(
            settings.model,
            num_classes=len(data.classes),
            options=settings.hafa,
            img_size=settings.recipe["img_size"],
            drop_path_rate=settings.recipe["drop_path"],
            drop_rate=settings.recipe["drop_rate"],
        )

    def prepare_network(self, network, settings: ClassificationSettings, processes: ProcessContext) -> None:
        """Start from --init-from (hafa.load_pretrained, the classifier re-initialised); --grad-checkpointing."""
        if settings.init_from:
            load_pretrained(network, settings.init_from, verbose=processes.is_main)
        if settings.grad_checkpointing:
            network.set_grad_checkpointing(True)

    def scheduler(self, optimizer: torch.optim.Optimizer, recipe: dict, *, updates_per_epoch: int, epochs: int):
        """Cosine decay to min_lr after a linear warm-up, stepped every update."""
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched="cosine",
            num_epochs=epochs,
            warmup_epochs=recipe["warmup_epochs"],
            warmup_lr=recipe["warmup_lr"],
            min_lr=recipe["min_lr"],
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
        return scheduler

    def loss(self, settings: ClassificationSettings, data: TrainingData, device: torch.device):
        """The criterion of the recipe (label smoothing, Mixup / CutMix targets) on images [B, 3, H, W]."""
        recipe = settings.recipe
        mixup = build_mixup(recipe, len(data.classes))
        if mixup is not None and recipe["batch_size"] % 2:
            raise UserError("mixup/cutmix need an even --batch-size per process")
        criterion = build_criterion(recipe, mixup)

        def loss(network, batch):
            images, targets, skipped = batch
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            return criterion(network(images), targets), images.shape[0], skipped

        return loss

    def evaluate(self, network, data: TrainingData, settings: ClassificationSettings, processes: ProcessContext):
        return evaluate_classification(
            network, data.val, settings.recipe["batch_size"], settings.workers, processes, settings.amp
        )

    def curves_note(self, recipe: dict) -> str:
        """Why the training loss is not the validation loss (it often sits above it)."""
        extras = []
        if recipe["smoothing"] > 0:
            extras.append(f"label smoothing {recipe['smoothing']:g}")
        if recipe["mixup"] > 0 or recipe["cutmix"] > 0:
            extras.append("Mixup / CutMix targets")
        return (
            "train loss: on augmented training images"
            + (f", with {' and '.join(extras)}" if extras else "")
            + "; val loss: plain cross-entropy on the unaugmented validation images"
        )


TASK = Classification()


def build_mixup(recipe: dict, num_classes: int) -> Mixup | None:
    if recipe["mixup"] <= 0 and recipe["cutmix"] <= 0:
        return None
    return Mixup(
        mixup_alpha=recipe["mixup"],
        cutmix_alpha=recipe["cutmix"],
        prob=recipe["mixup_prob"],
        switch_prob=recipe["mixup_switch_prob"],
        label_smoothing=recipe["smoothing"],
        num_classes=num_classes,
    )


def build_criterion(recipe: dict, mixup: Mixup | None) -> torch.nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup makes the smoothed soft targets
    if recipe["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(recipe["smoothing"])
    return torch.nn.CrossEntropyLoss()


def train_transform(recipe: dict):
    return create_transform(
        recipe["img_size"],
        is_training=True,
        scale=tuple(recipe["scale"]),
        ratio=tuple(recipe["ratio"]),
        hflip=recipe["hflip"],
        color_jitter=recipe["color_jitter"],
        auto_augment=recipe["auto_augment"],
        interpolation=recipe["interpolation"],
        mean=tuple(recipe["mean"]),
        std=tuple(recipe["std"]),
        re_prob=recipe["reprob"],
        re_mode="pixel",
    )


def eval_transform(recipe: dict):
    """Resize, then the center crop of the paper (crop_pct of the resized image)."""
    return create_transform(
        recipe["img_size"],
        is_training=False,
        interpolation=recipe["interpolation"],
        mean=tuple(recipe["mean"]),
        std=tuple(recipe["std"]),
        crop_pct=recipe["crop_pct"],
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_options(parser, __doc__, TASK)
    parser.add_argument(
        "--data", help="ROOT with ROOT/train/<class>/* and ROOT/val/<class>/* (default: the embedded MNIST-5k)"
    )
    add_recipe_file_option(parser, TASK)
    parser.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from a (baseline) checkpoint: hafa.load_pretrained, classifier re-initialised",
    )
    add_setting(parser, "--num-classes", setting=NUM_CLASSES, help="check that the data has this many classes")
    parser.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    add_recipe_and_run_options(parser, TASK, "mixup=0 smoothing=0.0")


def run_train(args) -> int:
    return train_command(TASK, args)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="best.pth / last.pth of hafa train, or a state dict")
    parser.add_argument("--model", help="model name (default: the checkpoint's)")
    parser.add_argument("--data", help="ROOT with ROOT/val/<class>/* (default: the checkpoint's training data)")
    add_setting(
        parser, "--num-classes", setting=NUM_CLASSES, help="classes of a plain state dict (default: the data's)"
    )
    add_setting(parser, "--batch-size", setting=Whole(64, low=1))
    add_setting(
        parser, "--img-size", setting=image_side(optional=True), help="default: the checkpoint's recipe, else 224"
    )
    add_json_option(parser, "the metrics")
    add_model_options(parser)
    add_run_options(parser)


def run_eval(args) -> int:
    return evaluate_and_report(args, _evaluate_checkpoint, _print_metrics)


def _print_metrics(metrics: dict) -> None:
    print(
        f"{metrics['model']} on {metrics['data']}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
        f"loss {metrics['loss']:.4f}  ({metrics['images']} images"
        + (f", {metrics['skipped']} unreadable skipped)" if metrics["skipped"] else ")")
    )


def _evaluate_checkpoint(args, processes: ProcessContext) -> dict:
    source = read_saved_or_state_dict(args.checkpoint)
    if isinstance(source, Checkpoint):
        check_task(source, "classification", "hafa eval")
        check_model_options(
            source, model_name=args.model, num_classes=args.num_classes, hafa_options=hafa_options_of(args)
        )
        recipe, classes, data = dict(source.settings["recipe"]), source.classes, args.data or source.settings["data"]
    else:
        recipe, classes, data = CLASSIFICATION_RECIPE.defaults(), None, args.data
    if args.img_size:
        recipe["img_size"] = args.img_size
    if data is None:
        raise UserError(f"{args.checkpoint} is a plain state dict: say which data to evaluate on with --data")
    if data == os.path.abspath(default_data_root()):
        data = prepare_mnist5k(data)  # the embedded set, written again if the cache was cleared
    dataset = ImageFolderDataset(data, "val", eval_transform(recipe), classes=classes)
    if isinstance(source, Checkpoint):
        model, name = build_model(source), source.model_name
    else:
        num_classes = args.num_classes or len(dataset.classes)
        if num_classes != len(dataset.classes):
            raise UserError(f"--num-classes {num_classes}, but {data} has {len(dataset.classes)} classes")
        model = build_classifier_from_state_dict(
            source, args.checkpoint, args.model, num_classes, HafaOptions.of(hafa_options_of(args)), recipe["img_size"]
        )
        name = args.model
    model.to(processes.device)
    compile_network(model, args.compile, name=name)
    metrics = evaluate_classification(model, dataset, args.batch_size, args.workers, processes, args.amp)
    return dict(metrics, model=name, data=data, checkpoint=args.checkpoint)


@torch.no_grad()
def predict_classification(
    checkpoint: str, image_path: str, output_png: str, top_k: int = 5, device: str = "cpu"
) -> dict:
    """Classify one image with a `hafa train` checkpoint and write it as a PNG titled with the top
    classes. -> dict(output, top: [(class name, probability %)])."""
    saved = read_saved(checkpoint, "classification", "hafa predict")
    classes, recipe = saved.classes, saved.settings["recipe"]
    model = build_model(saved)
    image = read_rgb(image_path)
    if image is None:
        raise UserError(f"cannot read the image {image_path}")
    logits = model.eval().to(device)(eval_transform(recipe)(image)[None].to(device))[0]
    probabilities, indices = logits.float().softmax(-1).topk(min(top_k, len(classes)))
    top = [(classes[i], 100 * p) for p, i in zip(probabilities.tolist(), indices.tolist())]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4.6))
    axis.imshow(image)
    axis.set_axis_off()
    axis.set_title("\n".join(f"{name}: {p:.1f}%" for name, p in top[:3]), fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output_png)), exist_ok=True)
    figure.savefig(output_png, dpi=100, format="png")
    plt.close(figure)
    return dict(output=output_png, top=top)
