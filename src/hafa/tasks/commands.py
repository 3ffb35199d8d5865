"""What the task commands (train, seg-train, det-train and their evals) share on the command line:
the HAFA model and run options, running a job in one or several processes, training each model of a
list (a HAFA model and, on request, its baseline), resume checks and the summary against baselines."""

import argparse
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from ..checkpoint import TRAINING_STATE_FIELDS, Checkpoint
from ..errors import UserError
from ..models._base import HAFA_OPTIONS
from ..models.table import BASELINE
from ..spec import Mapping, Number, RecipeSpec, SettingError, Whole
from .networks import backbone_arguments
from .options import Device, OutputDir, add_setting, write_json
from .processes import ProcessContext, barrier, close_processes, init_processes
from .recipes import load_recipe, override_recipe
from .run_log import setup_console_logging
from .saved import read_saved_or_state_dict
from .settings import RUN_OPTIONS, RunSettings
from .training import TrainState

# the embedded-data demos of every task: the smallest HAFA model and its baseline
DEMO_MODELS = ("hafa_pvt_v2_b0", "pvt_v2_b0")
# recipe settings that may change on --resume without breaking exactness
RESUME_FREE = ("workers", "device", "keep", "compile", "epochs", "iterations")
# run settings that must not
RESUME_FIXED = ("model", "data", "hafa_options", "amp", "num_classes")


def add_training_options(parser, description: str, kind: str, task: str) -> None:
    """The options every training command has: the models, their baselines, where runs go, --resume."""
    parser.description = description
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model", nargs="+", help=f"timm {kind} name(s); default {' and '.join(DEMO_MODELS)} on the embedded data"
    )
    parser.add_argument("--baseline", action="store_true", help="also train the baseline of each HAFA model")
    add_setting(
        parser,
        "--output",
        setting=OutputDir(os.path.join("runs", task)),
        help="runs go to OUTPUT/<model>",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in OUTPUT/<model> exactly")
    parser.set_defaults(continue_with=CONTINUE_WITH)
    add_setting(
        parser,
        "--keep",
        setting=RUN_OPTIONS["keep"],
        help="what a finished run keeps: last.pth (to resume or extend it), best.pth (to evaluate), or both",
    )
    parser.add_argument(
        "--skip-data-check",
        action="store_true",
        help="do not read every file's header before training (for data known to be good; see docs/data.md)",
    )


def add_model_options(parser) -> None:
    group = parser.add_argument_group("HAFA model options (ignored for baselines)")
    add_setting(
        group,
        "--stage-aggregation",
        setting=HAFA_OPTIONS["stage_aggregation"],
        default=None,
        metavar=("T12", "T23", "T34"),
        help="'conv', 'laa' or 'sia' for the transitions 1->2, 2->3, 3->4",
    )
    group.add_argument("--cluster-qkv", action="store_true", help="cluster keys and values too (paper Table 5)")
    add_setting(group, "--cluster-ratio", setting=HAFA_OPTIONS["cluster_ratio"], default=None, help="SIA's clusters")
    add_setting(group, "--knn-k", setting=HAFA_OPTIONS["knn_k"], default=None, help="DPC-KNN's density")
    add_setting(
        group,
        "--laa-norm",
        setting=HAFA_OPTIONS["laa_norm"],
        default=None,
        help="LAA's norm: BatchNorm as the authors (batch), or the baseline's own (the baseline at step 0)",
    )


def hafa_options_of(args) -> dict:
    """The HAFA constructor arguments given on the command line."""
    chosen = {}
    if args.stage_aggregation:
        chosen["stage_aggregation"] = tuple(args.stage_aggregation)
    if args.cluster_qkv:
        chosen["cluster_qkv"] = True
    for option in ("cluster_ratio", "knn_k", "laa_norm"):
        if getattr(args, option) is not None:
            chosen[option] = getattr(args, option)
    return chosen


def add_run_options(parser) -> None:
    add_setting(parser, "--workers", setting=RUN_OPTIONS["workers"], help="data loading processes per process")
    add_setting(parser, "--device", setting=Device(), help="default: cuda when available")
    add_setting(
        parser, "--amp", setting=RUN_OPTIONS["amp"], help="autocast: bf16 (CPU or GPU) or fp16 (GPU, loss scaling)"
    )
    add_setting(
        parser,
        "--compile",
        setting=RUN_OPTIONS["compile"],
        nargs="?",
        const="default",
        metavar="MODE",
        help="torch.compile the network (one graph where the network allows; --compile alone: inductor's default; "
        "checkpoints hold the uncompiled weights' names)",
    )


def add_batchnorm_options(parser, dense: bool = True) -> None:
    """LAA's BatchNorm under several processes; dense tasks (few images per GPU, noisy statistics)
    synchronise it by default and can keep a loaded backbone's statistics (--norm-eval)."""
    group = parser.add_argument_group("BatchNorm (no effect on models without it)")
    group.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=dense,
        help="under torchrun on GPUs, BatchNorm statistics over all processes (SyncBatchNorm; default "
        + ("on)" if dense else "off, as timm's ImageNet training)"),
    )
    if dense:
        group.add_argument(
            "--norm-eval",
            action=argparse.BooleanOptionalAction,
            help="keep the backbone's BatchNorm statistics as loaded (default: on when it starts from a checkpoint)",
        )


def norm_eval(args, backbone_checkpoint: str | None) -> bool:
    return bool(backbone_checkpoint) if args.norm_eval is None else args.norm_eval


def add_recipe_option(group, spec: RecipeSpec, key: str, help: str = "", **kwargs) -> None:
    """--key-name for the recipe setting `key`, checked by its setting; not given: the recipe's value."""
    add_setting(group, f"--{key.replace('_', '-')}", setting=spec[key], default=None, dest=key, help=help, **kwargs)


def add_recipe_overrides(parser, spec: RecipeSpec, set_example: str):
    """The group of recipe overrides with what every task has (--batch-size, --lr, --seed, --set); the
    task adds its own options to the group it returns."""
    group = parser.add_argument_group("recipe overrides (default: the recipe's values)")
    add_recipe_option(group, spec, "batch_size")
    add_recipe_option(group, spec, "lr")
    add_recipe_option(group, spec, "seed")
    group.add_argument(
        "--set",
        nargs="+",
        default=[],
        action="extend",
        metavar="KEY=VALUE",
        help=f"any recipe setting, e.g. --set {set_example} (YAML values; a key given twice takes the last)",
    )
    return group


def recipe_from_args(args, spec: RecipeSpec, default_recipe: str, option_keys: Sequence[str]) -> dict:
    """The run's recipe: the file (--recipe, else `default_recipe`), the recipe options given, --set."""
    recipe = load_recipe(args.recipe or default_recipe, spec)
    return override_recipe(recipe, {key: getattr(args, key) for key in option_keys}, args.set, spec)


def run_in_processes(job: Callable, args) -> int:
    """job(args, processes) in this process, one of torchrun's when launched by it; -> its exit status."""
    setup_console_logging()
    processes = init_processes(args.device)
    try:
        return job(args, processes)
    finally:
        close_processes()


def prepare_on_main(prepare: Callable[[], str], processes: ProcessContext) -> str:
    """Embedded data written once by the main process (the others wait); -> its path, on every process."""
    if processes.is_main:
        prepare()
    barrier(processes)
    return prepare()


def models_to_train(names: Sequence[str], with_baselines: bool, demo_models: Sequence[str], own_data: bool) -> list:
    models = list(names or ([] if own_data else demo_models))
    if not models:
        raise UserError("with your own data, choose the model(s) with --model")
    if with_baselines:
        models += [BASELINE[m] for m in models if m in BASELINE and BASELINE[m] not in models]
    return models


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
        backbone_arguments(settings.model, settings.hafa_options)
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


def baseline_pairs(results: list[dict]) -> list[tuple[dict, dict]]:
    """(HAFA result, its baseline's result) for the pairs that both trained at least one epoch."""
    trained = {r["model"]: r for r in results if r["best_epoch"] > 0}
    return [(r, trained[BASELINE[r["model"]]]) for r in trained.values() if BASELINE.get(r["model"]) in trained]


def print_best_scores(results: list[dict], score: str) -> None:
    """The best validation score of each model, and each HAFA model against its baseline."""
    print(f"\n| model | best val {score} (%) | at epoch | best checkpoint | curves |")
    print("|---|---:|---:|---|---|")
    for r in results:
        checkpoint = r["best_checkpoint"] or f"(not kept; last epoch: {r['last_checkpoint']})"
        print(f"| {r['model']} | {r['best_score']:.2f} | {r['best_epoch']} | {checkpoint} | {r['curves']} |")
    for hafa, base in baseline_pairs(results):
        print(f"{hafa['model']} vs {base['model']}: {hafa['best_score'] - base['best_score']:+.2f} points {score}")


# How a stopped training command goes on (`continue_with`; hafa ablate, which resumes its runs itself,
# says its own).
CONTINUE_WITH = "the same command plus --resume"


def finish_training(
    results: list[dict],
    processes: ProcessContext,
    print_summary: Callable[[list[dict]], None],
    continue_with: str = CONTINUE_WITH,
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
