"""The one training job every task runs, and the evaluation job of the eval commands.

`train_command(task, args)` is `hafa train`, seg-train and det-train: the settings of each model to
train (a HAFA model and, on request, its baseline) built from the options and checked before the first
one trains, then `train_model(task, settings, processes)` for each: the task's data, network, loss and
evaluation handed to the training loop (hafa.tasks.training). Both jobs run in one process, or in
each of torchrun's.
"""

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from functools import partial
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from ..checkpoint import TRAINING_STATE_FIELDS, Checkpoint, checkpoint_content
from ..compiled import compile_network
from ..errors import UserError
from ..models.table import BASELINE
from ..spec import Mapping, Number, SettingError, Whole, write_json
from .arguments import DEMO_MODELS, hafa_options_of, recipe_from_args
from .networks import backbone_of, build_model, check_hafa_options, create_network
from .processes import ProcessContext, barrier, close_processes, init_processes
from .run_log import setup_console_logging
from .run_settings import RunSettings
from .sampling import EpochSampler
from .saved import read_saved_or_state_dict
from .task import Task
from .training import Training, TrainState, plain_numbers, train

_logger = logging.getLogger("hafa")

# recipe settings that may change on --resume without breaking exactness
RESUME_FREE = ("workers", "device", "keep", "compile", "epochs", "iterations")
# run settings that must not
RESUME_FIXED = ("model", "data", "hafa_options", "amp", "num_classes")


def run_in_processes(job: Callable, args) -> int:
    """job(args, processes) in this process, one of torchrun's when launched by it; -> its exit status."""
    setup_console_logging()
    processes = init_processes(args.device)
    try:
        return job(args, processes)
    finally:
        close_processes()


def train_command(task: Task, args) -> int:
    """A task's training command (hafa train, seg-train, det-train) with its parsed options."""
    return run_in_processes(partial(train_job, task), args)


def train_job(task: Task, args, processes: ProcessContext) -> int:
    """Train each model the options name on the task's data into OUTPUT/<model>; -> the exit status
    (130 when a run was interrupted)."""
    chosen = task.settings_from_options(args)
    embedded_data = task.uses_embedded_data(chosen)
    recipe = recipe_from_args(args, task, embedded_data)
    models = models_to_train(args.model, args.baseline, own_data=not embedded_data)
    data = task.prepare_data(chosen, processes, check_files=not args.skip_data_check)

    def settings_for(name: str) -> RunSettings:
        settings = task.settings_class(
            **data,
            model=name,
            recipe=recipe,
            run_dir=os.path.join(args.output, name),
            resume=args.resume,
            hafa_options=hafa_options_of(args),
            amp=args.amp,
            keep=args.keep,
            compile=args.compile,
            workers=args.workers,
            device=args.device,
        )
        choose_laa_norm_for_the_start(task, settings)
        return settings

    results = train_models(models, settings_for, partial(train_model, task), processes)
    return finish_training(results, processes, task.print_summary, args.continue_with)


def choose_laa_norm_for_the_start(task: Task, settings: RunSettings) -> None:
    """A HAFA model that starts from weights and whose --laa-norm is not given takes the LAA mode of
    those weights: a hafa checkpoint's own, and "baseline" for a baseline's (a checkpoint, or a state
    dict without LAA offsets): its transitions then start as the baseline's, the start that kept the
    most in docs/upcycling.md's study. From scratch the default stays the paper's "batch". A resumed
    run keeps the mode it was started with (a run started before this rule recorded none)."""
    start = task.starting_checkpoint(settings)
    if start is None or settings.model not in BASELINE or "laa_norm" in settings.hafa_options:
        return
    last = os.path.join(settings.run_dir, "last.pth")
    if settings.resume and os.path.isfile(last):
        saved = read_saved_or_state_dict(last)
        if isinstance(saved, Checkpoint) and "laa_norm" in saved.settings.get("hafa_options", {}):
            settings.hafa_options["laa_norm"] = saved.settings["hafa_options"]["laa_norm"]
        return
    source = read_saved_or_state_dict(start)
    if isinstance(source, Checkpoint):
        laa_norm = source.model_args.get("backbone", source.model_args).get("laa_norm", "baseline")
    elif any(".offset." in name for name in source):
        return  # a HAFA model's plain state dict does not say its LAA mode
    else:
        laa_norm = "baseline"
    settings.hafa_options["laa_norm"] = laa_norm
    _logger.info(f"{settings.model}: LAA in {laa_norm!r} mode, as the weights it starts from (--laa-norm to choose)")


def prepare_on_main(prepare: Callable[[], str], processes: ProcessContext) -> str:
    """Embedded data written once by the main process (the others wait); -> its path, on every process."""
    if processes.is_main:
        prepare()
    barrier(processes)
    return prepare()


def models_to_train(names: Sequence[str], with_baselines: bool, own_data: bool) -> list:
    models = list(names or ([] if own_data else DEMO_MODELS))
    if not models:
        raise UserError("with your own data, choose the model(s) with --model")
    if with_baselines:
        models += [BASELINE[m] for m in models if m in BASELINE and BASELINE[m] not in models]
    return models


def train_models(
    models: Sequence[str],
    settings_for: Callable[[str], RunSettings],
    train_one_model: Callable[[RunSettings, ProcessContext], dict],
    processes: ProcessContext,
) -> list[dict]:
    """train_one_model(settings_for(name), processes) for each model in turn, until one is interrupted.
    What would stop a later model (its name, its options, its run folder, a resume that does not
    match) is found before the first one trains."""
    runs = [settings_for(name).check() for name in models]
    for settings in runs:
        check_hafa_options(settings.model, settings.hafa)
        check_run_dir(settings.run_dir, settings.resume)
        if settings.resume:
            check_resumable(settings)
    results = []
    for settings in runs:
        results.append(train_one_model(settings, processes))
        if results[-1]["status"] == "interrupted":
            break
    return results


def check_run_dir(run_dir: str, resume: bool) -> None:
    """A new run never overwrites an old one; --resume needs one to continue."""
    last, best = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "best.pth")
    if resume and not os.path.isfile(last):
        kept_best = " (the run kept only best.pth: --keep best)" if os.path.isfile(best) else ""
        raise UserError(f"nothing to resume: {last} does not exist{kept_best}")
    if not resume and (os.path.isfile(last) or os.path.isfile(best)):
        raise UserError(f"{run_dir} already holds a run; add --resume to continue it, or choose another --output")


# What a last.pth's train_state holds (training.TrainState's fields), each with its setting.
TRAIN_STATE = dict(
    epoch=Whole(low=0),
    step_in_epoch=Whole(low=0),
    global_step=Whole(low=0),
    best_score=Number(),
    best_epoch=Whole(low=-1),
    epoch_loss_sum=Number(),
    epoch_steps=Whole(low=0),
    best_metrics=Mapping(optional=True),
    start_metrics=Mapping(optional=True),
)


def _check_training_state(checkpoint: Checkpoint) -> None:
    """What a resume reads besides the model: every field of the training state there, its train_state
    of TrainState's fields and types (best_score -inf before a first finished epoch)."""
    missing = [key for key in TRAINING_STATE_FIELDS if key not in checkpoint.content]
    if missing:
        raise UserError(f"{checkpoint.path} lacks {', '.join(missing)}: it is not a last.pth a run can be resumed from")
    state = checkpoint.content["train_state"]
    where = f"{checkpoint.path}: train_state"
    declared = [f.name for f in fields(TrainState)]
    if set(state) != set(declared):
        raise SettingError(f"{where} must hold {', '.join(declared)}, not {', '.join(map(str, state))}")
    for key, value in state.items():
        if not (key == "best_score" and value == -math.inf):
            TRAIN_STATE[key].check(value, f"{where}.{key}")


def check_resumable(settings: RunSettings) -> None:
    """A resumed run must be the same run: same model, data and recipe (epochs may grow); its last.pth
    read through the checks every checkpoint reader makes, and its training state's."""
    last = os.path.join(settings.run_dir, "last.pth")
    current = settings.as_dict()
    checkpoint = read_saved_or_state_dict(last)
    if not isinstance(checkpoint, Checkpoint):
        raise UserError(f"{last} is not a checkpoint of a hafa run; it cannot be resumed")
    _check_training_state(checkpoint)
    saved = checkpoint.settings
    differences = [key for key in RESUME_FIXED if saved.get(key) != current.get(key)]
    differences += [
        f"recipe.{k}" for k in settings.recipe if k not in RESUME_FREE and saved["recipe"].get(k) != settings.recipe[k]
    ]
    if differences:
        raise UserError(
            f"--resume with settings that differ from the saved run in {settings.run_dir}: {', '.join(differences)}"
        )


def build_optimizer(model: nn.Module, recipe: dict, global_batch: int) -> torch.optim.Optimizer:
    """AdamW (by default) with lr scaled linearly from lr_base_batch to the global batch; no weight
    decay on biases, norms, position embeddings and class tokens (timm's filter + no_weight_decay)."""
    lr = recipe["lr"] * global_batch / recipe["lr_base_batch"]
    extra = dict(betas=tuple(recipe["opt_betas"]), eps=recipe["opt_eps"]) if "adam" in recipe["opt"] else {}
    return create_optimizer_v2(model, opt=recipe["opt"], lr=lr, weight_decay=recipe["weight_decay"], **extra)


def train_model(task: Task, settings: RunSettings, processes: ProcessContext) -> dict:
    """Train settings.model on settings.data into settings.run_dir as `task` says. -> metrics, paths and
    the trained network (hafa.tasks.training.train's result, with the model's name)."""
    recipe = settings.check().recipe
    torch.manual_seed(recipe["seed"])
    data = task.datasets(settings, processes)
    model_args = task.network_arguments(settings, data)
    model = create_network(task.name, settings.model, model_args)
    task.prepare_network(model, settings, processes)
    start = task.starting_checkpoint(settings)
    model.to(processes.device)
    compile_network(task.compiled_part(model), settings.compile, name=settings.model)
    sampler = EpochSampler(len(data.train), recipe["batch_size"], processes, seed=recipe["seed"])
    epochs = task.epochs(recipe, sampler.batches_per_epoch())
    optimizer = build_optimizer(model, recipe, sampler.global_batch)
    training = Training(
        name=settings.model,
        run_dir=settings.run_dir,
        model=model,
        train_set=data.train,
        collate_fn=data.collate,
        sampler=sampler,
        workers=settings.workers,
        epochs=epochs,
        optimizer=optimizer,
        scheduler=task.scheduler(optimizer, recipe, updates_per_epoch=sampler.batches_per_epoch(), epochs=epochs),
        loss=task.loss(settings, data, processes.device),
        evaluate=lambda network: task.evaluate(network, data, settings, processes),
        score=task.score,
        resume=settings.resume,
        amp=settings.amp,
        clip_grad=recipe["clip_grad"],
        sync_batchnorm=settings.sync_bn,
        frozen_norms=backbone_of(task.name, model) if task.dense and settings.norm_eval else None,
        sample_names=data.sample_names,
        header=checkpoint_content(
            task=task.name,
            model_name=settings.model,
            model_args=model_args,
            classes=data.classes,
            settings=dict(settings.as_dict(), **data.found_settings),
        ),
        curves=task.curves,
        curves_note=task.curves_note(recipe),
        keep=settings.keep,
        compiled=settings.compile,
        length_option=task.length_option,
        evaluate_at_start=start is not None,
        source_metrics=None
        if start is None or settings.resume
        else source_metrics(task, start, data, settings, processes),
    )
    message = task.start_message(settings, data, sampler, epochs)
    if message and processes.is_main and not settings.resume:
        print(message)
    return dict(train(training, processes), model=settings.model)


def source_metrics(task: Task, path: str, data, settings: RunSettings, processes: ProcessContext) -> dict | None:
    """The validation metrics of the network a run's weights come from, when `path` is a checkpoint of the
    same task and classes (None otherwise: a backbone of another task, a plain state dict)."""
    source = read_saved_or_state_dict(path)
    if not isinstance(source, Checkpoint) or source.task != task.name or source.classes != data.classes:
        return None
    network = build_model(source).to(processes.device)
    return plain_numbers(task.evaluate(network, data, settings, processes))


def finish_training(
    results: list[dict], processes: ProcessContext, print_summary: Callable[[list[dict]], None], continue_with: str
) -> int:
    """The summary on the main process; -> 130 when a run was interrupted (and how to go on:
    `continue_with`), else 0."""
    interrupted = [r for r in results if r["status"] == "interrupted"]
    if processes.is_main:
        print_summary(results)
        if interrupted:
            print(f"stopped early; continue with {continue_with} (saved in {interrupted[0]['run_dir']})")
    return 130 if interrupted else 0


def evaluate_and_report(
    args,
    evaluate_checkpoint: Callable[[Any, ProcessContext], dict],
    print_metrics: Callable[[dict], None],
    json_values: Callable[[dict], dict] = lambda metrics: metrics,
) -> int:
    """An eval command: every process evaluates its shard of the checkpoint's data; the first prints
    the metrics and writes them as JSON when --json asks."""

    def job(args, processes: ProcessContext) -> int:
        metrics = evaluate_checkpoint(args, processes)
        if processes.is_main:
            print_metrics(metrics)
            if args.json:
                write_json(args.json, json_values(metrics))
        return 0

    return run_in_processes(job, args)
