"""Image classification: `hafa train` and `hafa eval`.

The paper's recipe (Sec. 4.1) on timm's pipeline: RandAugment, random erasing, Mixup/CutMix, label
smoothing, AdamW, a cosine schedule with warm-up, stochastic depth. One process, or several with
`torchrun --nproc_per_node=N -m hafa train ...` (DistributedDataParallel). Without --data the
embedded MNIST-5k trains a HAFA model and its baseline with a short recipe, side by side.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy

from ..checkpoint import (
    Checkpoint,
    build_classifier_from_state_dict,
    build_model,
    check_model_options,
    check_task,
    checkpoint_content,
    read_checkpoint,
    read_checkpoint_or_state_dict,
)
from ..data.checks import check_image_folder
from ..data.folder import ImageFolderDataset, collate_skipping, read_rgb
from ..data.mnist import default_data_root, prepare_mnist5k
from ..errors import UserError
from ..pretrained import load_pretrained
from .commands import (
    DEMO_MODELS,
    add_model_options,
    add_recipe_overrides,
    add_run_options,
    add_training_options,
    evaluate_and_report,
    finish_training,
    hafa_options_of,
    models_to_train,
    prepare_on_main,
    print_best_scores,
    run_in_processes,
    train_models,
)
from .networks import classifier_arguments, create_network
from .options import check_input_size, check_recipe
from .processes import ProcessContext, all_sum
from .recipes import build_optimizer, load_recipe, override_recipe
from .run_log import progress_bar
from .sampling import EpochSampler, evaluation_loader
from .settings import ClassificationSettings
from .training import Training, autocast_context, train

# Every recipe setting, with timm's usual values; a recipe file overrides some, options override it.
RECIPE_DEFAULTS = dict(
    epochs=300,
    batch_size=128,
    lr=1e-3,
    lr_base_batch=128,
    min_lr=1e-5,
    warmup_epochs=5,
    warmup_lr=1e-6,
    opt="adamw",
    opt_betas=[0.9, 0.999],
    opt_eps=1e-8,
    weight_decay=0.05,
    clip_grad=None,
    img_size=224,
    crop_pct=0.875,
    interpolation="bicubic",
    mean=[0.485, 0.456, 0.406],
    std=[0.229, 0.224, 0.225],
    scale=[0.08, 1.0],
    ratio=[0.75, 1.3333],
    hflip=0.5,
    color_jitter=0.4,
    auto_augment="rand-m9-mstd0.5-inc1",
    reprob=0.25,
    mixup=0.8,
    cutmix=1.0,
    mixup_prob=1.0,
    mixup_switch_prob=0.5,
    smoothing=0.1,
    drop_path=0.1,
    drop_rate=0.0,
    seed=0,
)


# ---------------------------------------------------------------- building blocks


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: dict, updates_per_epoch: int):
    """Cosine decay to min_lr after a linear warm-up, stepped every update."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=recipe["epochs"],
        warmup_epochs=recipe["warmup_epochs"],
        warmup_lr=recipe["warmup_lr"],
        min_lr=recipe["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


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


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model, dataset, batch_size: int, workers: int, processes: ProcessContext, amp: str = "none", desc: str = "eval"
) -> dict:
    """Loss, top-1 and top-5 (%) over the dataset, shared among the processes."""
    model.eval()
    loader = evaluation_loader(dataset, batch_size, workers, processes, collate_skipping)
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, images, skipped files
    for images, targets, skipped in progress_bar(loader, processes, desc=desc, leave=False):
        sums[4] += skipped
        if images is None:
            continue
        images, targets = images.to(processes.device), targets.to(processes.device)
        with autocast_context(amp, processes.device):
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        n = targets.shape[0]
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").item()
        sums[1] += top1.item() * n / 100
        sums[2] += top5.item() * n / 100
        sums[3] += n
    loss, hits1, hits5, count, skipped = all_sum(sums, processes)
    if count == 0:
        raise UserError("no readable validation images")
    return dict(
        loss=loss / count, top1=100 * hits1 / count, top5=100 * hits5 / count, images=int(count), skipped=int(skipped)
    )


# ---------------------------------------------------------------- training


def train_one_model(settings: ClassificationSettings, processes: ProcessContext) -> dict:
    """Train settings.model on settings.data into settings.run_dir. -> metrics, paths and the trained network."""
    recipe = settings.recipe
    torch.manual_seed(recipe["seed"])
    train_set = ImageFolderDataset(
        settings.data, "train", train_transform(recipe), replace_unreadable=True, seed=recipe["seed"]
    )
    val_set = ImageFolderDataset(settings.data, "val", eval_transform(recipe), classes=train_set.classes)
    classes = train_set.classes
    if settings.num_classes is not None and settings.num_classes != len(classes):
        raise UserError(f"--num-classes {settings.num_classes} but {settings.data} has {len(classes)} classes")
    model_args = classifier_arguments(
        settings.model,
        num_classes=len(classes),
        hafa_options=settings.hafa_options,
        img_size=recipe["img_size"],
        drop_path_rate=recipe["drop_path"],
        drop_rate=recipe["drop_rate"],
    )
    model = create_network("classification", settings.model, model_args)
    if settings.init_from:
        load_pretrained(model, settings.init_from, verbose=processes.is_main)
    if settings.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(processes.device)

    sampler = EpochSampler(len(train_set), recipe["batch_size"], processes, seed=recipe["seed"])
    optimizer = build_optimizer(model, recipe, sampler.global_batch)
    mixup = build_mixup(recipe, len(classes))
    if mixup is not None and recipe["batch_size"] % 2:
        raise UserError("mixup/cutmix need an even --batch-size per process")
    criterion = build_criterion(recipe, mixup)

    def loss(network, batch):
        images, targets, skipped = batch
        images = images.to(processes.device, non_blocking=True)
        targets = targets.to(processes.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        return criterion(network(images), targets), images.shape[0], skipped

    training = Training(
        name=settings.model,
        run_dir=settings.run_dir,
        model=model,
        train_set=train_set,
        collate_fn=collate_skipping,
        sampler=sampler,
        workers=settings.workers,
        epochs=recipe["epochs"],
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, recipe, sampler.batches_per_epoch()),
        loss=loss,
        evaluate=lambda network: evaluate(
            network, val_set, recipe["batch_size"], settings.workers, processes, settings.amp
        ),
        score="top1",
        resume=settings.resume,
        amp=settings.amp,
        clip_grad=recipe["clip_grad"],
        sample_names=[path for path, _ in train_set.samples],
        header=checkpoint_content(
            task="classification",
            model_name=settings.model,
            model_args=model_args,
            classes=classes,
            settings=settings.as_dict(),
        ),
        curves={"loss": ["train_loss", "val_loss"], "accuracy (%)": ["val_top1", "val_top5"]},
    )
    return dict(train(training, processes), model=settings.model)


# ---------------------------------------------------------------- commands


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_options(parser, __doc__, "model", "classification")
    parser.add_argument(
        "--data", help="ROOT with ROOT/train/<class>/* and ROOT/val/<class>/* (default: the embedded MNIST-5k)"
    )
    parser.add_argument(
        "--recipe", help="a recipe file or shipped name (default: imagenet_hafa with --data, mnist_demo without)"
    )
    parser.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from a (baseline) checkpoint: hafa.load_pretrained, classifier re-initialised",
    )
    parser.add_argument("--num-classes", type=int, help="check that the data has this many classes")
    parser.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    recipe = add_recipe_overrides(parser, "mixup=0 smoothing=0.0")
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--img-size", type=int)
    recipe.add_argument("--warmup-epochs", type=float)
    recipe.add_argument("--drop-path", type=float)
    recipe.add_argument("--clip-grad", type=float)
    add_model_options(parser)
    add_run_options(parser)


def run_train(args) -> int:
    return run_in_processes(_train, args)


def _recipe_from_args(args) -> dict:
    recipe = load_recipe(args.recipe or ("mnist_demo" if args.data is None else "imagenet_hafa"), RECIPE_DEFAULTS)
    keys = ("epochs", "batch_size", "lr", "img_size", "warmup_epochs", "drop_path", "clip_grad", "seed")
    recipe = override_recipe(recipe, {key: getattr(args, key) for key in keys}, args.set)
    check_recipe(recipe, whole=("epochs", "batch_size"), positive=("lr",), sizes=("img_size",))
    return recipe


def _train(args, processes: ProcessContext) -> int:
    recipe = _recipe_from_args(args)
    models = models_to_train(args.model, args.baseline, DEMO_MODELS, own_data=args.data is not None)
    data = args.data
    if data is None:
        data = prepare_on_main(prepare_mnist5k, processes)
        if processes.is_main:
            print(f"data: the embedded MNIST-5k (4,000 train / 1,000 val real digits) in {data}")
    if not args.skip_data_check:
        check_image_folder(data, progress=processes.is_main)

    def settings_for(name: str) -> ClassificationSettings:
        return ClassificationSettings(
            model=name,
            data=os.path.abspath(data),
            recipe=recipe,
            run_dir=os.path.join(args.output, name),
            resume=args.resume,
            init_from=args.init_from,
            num_classes=args.num_classes,
            hafa_options=hafa_options_of(args),
            grad_checkpointing=args.grad_checkpointing,
            amp=args.amp,
            workers=args.workers,
            device=args.device,
        )

    results = train_models(models, settings_for, train_one_model, processes)
    return finish_training(results, processes, lambda done: print_best_scores(done, "top-1"))


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="best.pth / last.pth of hafa train, or a state dict")
    parser.add_argument("--model", help="model name (default: the checkpoint's)")
    parser.add_argument("--data", help="ROOT with ROOT/val/<class>/* (default: the checkpoint's training data)")
    parser.add_argument("--num-classes", type=int, help="classes of a plain state dict (default: from the data)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, help="default: the checkpoint's recipe, else 224")
    parser.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
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
    if args.img_size:
        check_input_size(args.img_size, "--img-size")
    source = read_checkpoint_or_state_dict(args.checkpoint)
    if isinstance(source, Checkpoint):
        check_task(source, "classification", "hafa eval")
        check_model_options(
            source, model_name=args.model, num_classes=args.num_classes, hafa_options=hafa_options_of(args)
        )
        recipe, classes, data = dict(source.settings["recipe"]), source.classes, args.data or source.settings["data"]
    else:
        recipe, classes, data = dict(RECIPE_DEFAULTS), None, args.data
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
            source, args.checkpoint, args.model, num_classes, hafa_options_of(args), recipe["img_size"]
        )
        name = args.model
    model.to(processes.device)
    metrics = evaluate(model, dataset, args.batch_size, args.workers, processes, args.amp)
    return dict(metrics, model=name, data=data, checkpoint=args.checkpoint)


@torch.no_grad()
def predict_classification(
    checkpoint: str, image_path: str, output_png: str, top_k: int = 5, device: str = "cpu"
) -> dict:
    """Classify one image with a `hafa train` checkpoint and write it as a PNG titled with the top
    classes. -> dict(output, top: [(class name, probability %)])."""
    saved = read_checkpoint(checkpoint, "classification", "hafa predict")
    classes, recipe = saved.classes, ClassificationSettings.from_dict(saved.settings).recipe
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
