"""The command-line arguments the task commands share (train, seg-train, det-train and their evals):
the models a command trains and where their runs go, the recipe and its overrides, the HAFA model
options, how a run runs (data loading, device, autocast, compile) and BatchNorm, and what they
become (the recipe, the HAFA options, norm_eval)."""

import argparse
import os

from ..layers import HafaOptions
from ..spec import Device, OutputDir, RecipeSpec, add_setting
from .run_settings import RUN_OPTIONS, load_recipe, override_recipe
from .task import Task

# the embedded-data demos of every task: the smallest HAFA model and its baseline
DEMO_MODELS = ("hafa_pvt_v2_b0", "pvt_v2_b0")
# recipe settings every training command has an option for (a task adds its own: Task.recipe_options)
SHARED_RECIPE_OPTIONS = ("batch_size", "lr", "seed")
# How a stopped training command goes on (`continue_with`; hafa ablate, which resumes its runs itself,
# says its own).
CONTINUE_WITH = "the same command plus --resume"


def add_training_options(parser, description: str, task: Task) -> None:
    """The options every training command has: the models, their baselines, where runs go, --resume."""
    parser.description = description
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model",
        nargs="+",
        help=f"timm {task.network_kind} name(s); default {' and '.join(DEMO_MODELS)} on the embedded data",
    )
    parser.add_argument("--baseline", action="store_true", help="also train the baseline of each HAFA model")
    add_setting(
        parser,
        "--output",
        setting=OutputDir(os.path.join("runs", task.name)),
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


def add_recipe_file_option(parser, task: Task, data_options: str = "--data") -> None:
    """--recipe, whose default is the task's recipe for the data (the user's, named by `data_options`,
    or the embedded)."""
    parser.add_argument(
        "--recipe",
        help=f"a recipe file or shipped name (default: {task.recipe_for_own_data} with {data_options}, "
        f"{task.recipe_for_embedded_data} without)",
    )


def add_model_options(parser) -> None:
    group = parser.add_argument_group("HAFA model options (ignored for baselines)")
    add_setting(
        group,
        "--stage-aggregation",
        setting=HafaOptions.SETTINGS["stage_aggregation"],
        default=None,
        metavar=("T12", "T23", "T34"),
        help="'conv', 'laa' or 'sia' for the transitions 1->2, 2->3, 3->4",
    )
    group.add_argument("--cluster-qkv", action="store_true", help="cluster keys and values too (paper Table 5)")
    add_setting(
        group, "--cluster-ratio", setting=HafaOptions.SETTINGS["cluster_ratio"], default=None, help="SIA's clusters"
    )
    add_setting(group, "--knn-k", setting=HafaOptions.SETTINGS["knn_k"], default=None, help="DPC-KNN's density")
    add_setting(
        group,
        "--laa-norm",
        setting=HafaOptions.SETTINGS["laa_norm"],
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


def add_batchnorm_options(parser, dense: bool) -> None:
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


def add_recipe_and_run_options(parser, task: Task, set_example: str, **option_arguments: dict) -> None:
    """What follows a training command's own options: the recipe overrides (--batch-size, --lr, --seed,
    --set, and an option for each of the task's recipe_options, with its `option_arguments`), the HAFA
    model options, the run options and BatchNorm's."""
    spec = task.settings_class.RECIPE
    group = parser.add_argument_group("recipe overrides (default: the recipe's values)")
    for key in SHARED_RECIPE_OPTIONS:
        add_recipe_option(group, spec, key)
    group.add_argument(
        "--set",
        nargs="+",
        default=[],
        action="extend",
        metavar="KEY=VALUE",
        help=f"any recipe setting, e.g. --set {set_example} (YAML values; a key given twice takes the last)",
    )
    for key in task.recipe_options:
        add_recipe_option(group, spec, key, **option_arguments.get(key, {}))
    add_model_options(parser)
    add_run_options(parser)
    add_batchnorm_options(parser, dense=task.dense)


def recipe_from_args(args, task: Task, embedded_data: bool) -> dict:
    """The run's recipe: the file (--recipe, else the task's recipe for the data), the recipe options
    given, --set."""
    spec = task.settings_class.RECIPE
    shipped = task.recipe_for_embedded_data if embedded_data else task.recipe_for_own_data
    recipe = load_recipe(args.recipe or shipped, spec)
    options = {key: getattr(args, key) for key in (*SHARED_RECIPE_OPTIONS, *task.recipe_options)}
    return override_recipe(recipe, options, args.set, spec)
