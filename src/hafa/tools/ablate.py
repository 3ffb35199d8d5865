"""`hafa ablate STUDY`: one of the paper's ablations as ordinary training runs, row by row and seed by seed.

Studies: `stages` (Table 4: which transition gets LAA, SIA or a conv, and the rows the paper's text
reports), `clustering` (Table 5: SIA clusters the queries only, or queries, keys and values),
`cluster-ratio` and `knn-k` (the choices the paper fixes at 0.25 and 5; other values with --values).
Every run is `hafa train` (or seg-train / det-train with --task) of one HAFA model with the row's
options and a seed, in OUTPUT/<row>/seed<N>/<model>, with every training option of the task passed
through. A second call with the same arguments reuses the finished runs and resumes the interrupted
ones; a changed option is refused as --resume refuses it. A run whose loss becomes NaN is recorded as
collapsed (the paper reports LAA-LAA-LAA collapsing), not as a failure of the study.

The result goes to OUTPUT/ablation.md (per row: mean ± s.d. over the seeds, each seed's value,
parameters, the latency relative to the conv-conv-conv model, and the paper's figure where it has one
for a model of the family the paper ran the study on), OUTPUT/ablation.csv (a line per row and seed)
and OUTPUT/ablation.png (a dot per seed, the mean and the spread per row). An OUTPUT holds one study
of one model (OUTPUT/ablation.json says which): another study, model or task there is refused, as a
changed option is, instead of overwriting its results.
"""

import argparse
import copy
import csv
import importlib
import json
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from ..errors import UserError, unknown_name
from ..layers import BASELINE_AGGREGATION, HafaOptions
from ..models.registry import BASE_NAMES, BASELINE
from ..spec import Number, OutputDir, Values, Whole
from ..tasks.arguments import DEMO_MODELS
from ..tasks.job import run_in_processes, train_job
from ..tasks.networks import sized_model
from ..tasks.processes import ProcessContext, barrier
from ..tasks.run_log import format_metric
from ..tasks.saved import read_saved
from ..tasks.training import RESULT_FILE, NonFiniteLoss, NothingLeftToDo
from .bench.timing import interleaved_timings

# task -> (its module, whose TASK's score a row is judged by; the other metrics the table shows)
TASKS = {
    "classification": ("hafa.tasks.classification", ()),
    "segmentation": ("hafa.tasks.segmentation", ()),
    "detection": ("hafa.tasks.detection", ("segm_AP",)),
}
BASELINE_ROW = "CONV-CONV-CONV"
COLLAPSED_FILE = "collapsed.json"
STUDY_FILE = "ablation.json"  # which study of which model an output folder holds
RESULT_FILES = ("ablation.md", "ablation.csv", "ablation.png")


@dataclass(frozen=True)
class Row:
    """One row of a study: a name and the HAFA options it sets."""

    name: str
    options: dict


def _stages(kinds: str) -> Row:
    return Row(name=kinds, options=dict(stage_aggregation=kinds.lower().split("-")))


# The paper's figures: PVT-v2-B1 on ImageNet-1k, top-1 (%) and latency (ms, RTX 3090) for Table 4 and its
# text (None: training collapsed); PVT-Tiny for Table 5 (ImageNet top-1, COCO box / mask AP, ADE20K mIoU).
PAPER = {
    ("stages", "classification"): {
        "SIA-SIA-SIA": "79.4, 38.5 ms",
        "LAA-SIA-SIA": "79.7, 23.8 ms",
        "LAA-LAA-SIA": "79.8, 16.3 ms",
        "LAA-LAA-LAA": "collapsed",
        "LAA-LAA-CONV": "79.3 (text: -0.5)",
        "LAA-CONV-CONV": "79.1 (text: -0.7)",
        "CONV-LAA-SIA": "79.3 (text: -0.5)",
        "CONV-CONV-SIA": "79.3 (text: -0.5)",
        BASELINE_ROW: "78.7 (Table 6)",
    },
    ("clustering", "classification"): {"Q": "77.5", "QKV": "77.1"},
    ("clustering", "detection"): {"Q": "39.8 box / 37.1 mask AP", "QKV": "39.4 box / 36.9 mask AP"},
    ("clustering", "segmentation"): {"Q": "40.1", "QKV": "39.8"},
}
PAPER_SOURCES = {
    "stages": "PVT-v2-B1 on ImageNet-1k (Table 4 and its text; latency on an RTX 3090)",
    "clustering": "PVT-Tiny (Table 5)",
}
# The family of the model the paper ran each study on: its figures stand beside models of that family only.
PAPER_FAMILIES = {"stages": "pvt_v2", "clustering": "pvt"}


def study_rows(study: str, values: list | None) -> list[Row]:
    """The rows of a study; values: the cluster ratios or neighbour counts to try."""
    if study == "stages":
        names = ["SIA-SIA-SIA", "LAA-SIA-SIA", "LAA-LAA-SIA", "LAA-LAA-LAA", "LAA-LAA-CONV", "LAA-CONV-CONV"]
        names += ["CONV-LAA-SIA", "CONV-CONV-SIA"]
        return [_stages(name) for name in names] + [
            Row(name=BASELINE_ROW, options=dict(stage_aggregation=list(BASELINE_AGGREGATION)))
        ]
    if study == "clustering":
        return [Row(name="Q", options=dict(cluster_qkv=False)), Row(name="QKV", options=dict(cluster_qkv=True))]
    option, default = {"cluster-ratio": ("cluster_ratio", [0.1, 0.25, 0.5]), "knn-k": ("knn_k", [3, 5, 10])}[study]
    return [Row(name=f"{option}={value:g}", options={option: value}) for value in (values or default)]


STUDIES = ("stages", "clustering", "cluster-ratio", "knn-k")
VALUES = {"cluster-ratio": Values(None, item=Number(low=0, low_open=True, high=1), min_length=1, optional=True)}
VALUES["knn-k"] = Values(None, item=Whole(low=1), min_length=1, optional=True)


def _task_of(argv: list[str]) -> str:
    """--task as typed (the task's training options are added to the parser from it)."""
    known, _ = _task_parser().parse_known_args(argv)
    return known.task


def _task_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--task", choices=tuple(TASKS), default="classification")
    return parser


def add_arguments(parser, argv: list[str]) -> None:
    task = _task_of(argv)
    module = importlib.import_module(TASKS[task][0])
    module.add_train_arguments(parser)
    parser.description = __doc__
    for action in parser._actions:
        if action.dest in ("baseline", "resume", "seed", "keep"):
            action.help = argparse.SUPPRESS  # the study decides them for each run (refused when given)
    helps = {
        "model": "the HAFA model whose options the rows change (default the task's demo model)",
        "output": "the study's folder, one study of one model: OUTPUT/<row>/seed<N>/<model> for each run "
        "(default runs/ablate/<study>-<task>, and -<model> for another model than the demo's)",
    }
    for action in parser._actions:
        action.help = helps.get(action.dest, action.help)
    parser.add_argument("study", choices=STUDIES, help="the ablation: " + ", ".join(STUDIES))
    parser.add_argument("--task", choices=tuple(TASKS), default="classification", help="default classification")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=str,
        default=["0", "1", "2"],
        help="one run per row and seed (whole numbers >= 0; default 0 1 2)",
    )
    parser.add_argument("--values", nargs="+", help="cluster-ratio, knn-k: the values to try")
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="ROW",
        help="only these rows of the study, by name (e.g. LAA-LAA-SIA CONV-CONV-CONV)",
    )
    parser.set_defaults(output=None)


@dataclass
class RunResult:
    row: Row
    seed: int
    status: str  # "finished" or "collapsed"
    metrics: dict = field(default_factory=dict)
    best_epoch: int | None = None
    checkpoint: str | None = None
    note: str = ""


def family_of_model(model: str) -> str:
    """The family of a HAFA model (its baseline's), e.g. 'pvt_v2' for hafa_pvt_v2_b0."""
    return next(family for family, names in BASE_NAMES.items() if BASELINE[model] in names)


def _check_model(model: str) -> None:
    """The model a study changes must be a HAFA model: a baseline takes no HAFA options, so every row
    would train the same network."""
    if model in BASELINE:
        return
    hafa_form = f"hafa_{model}"
    if hafa_form in BASELINE:
        raise UserError(
            f"--model {model}: hafa ablate changes a HAFA model's options, and the baseline {model} has none "
            f"(every row would train the same network); study its HAFA form, {hafa_form}"
        )
    raise unknown_name("HAFA model", model, sorted(BASELINE))


def _check(args, rows: list[Row]) -> list[int]:
    """The ablation's own options; -> the seeds."""
    seeds = [Whole(low=0).parse(seed, "--seeds") for seed in args.seeds]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(args.seeds)}: each seed once")
    for option, given in (("--baseline", args.baseline), ("--resume", args.resume), ("--seed", args.seed is not None)):
        if given:
            raise UserError(f"{option} is for hafa ablate to decide (it reuses, resumes and seeds every run itself)")
    if args.keep != "both":
        raise UserError("--keep: hafa ablate keeps both checkpoints (last.pth shows a later call what is finished)")
    if args.model is not None and len(args.model) != 1:
        raise UserError("--model: hafa ablate studies one HAFA model")
    if args.model is not None:
        _check_model(args.model[0])
    for row in rows:
        for option in row.options:
            if getattr(args, option, None) not in (None, False):
                raise UserError(f"--{option.replace('_', '-')}: the {args.study} study sets it in every row")
    return seeds


# What a stopped run's training command says to do next: hafa ablate resumes its runs itself (it refuses --resume).
CONTINUE_WITH = "the same hafa ablate command (it resumes the run itself)"


def _run_args(args, row: Row, seed: int, output: str, model: str, first: bool):
    run = copy.copy(args)
    run.model, run.output, run.seed, run.baseline = [model], output, seed, False
    run.skip_data_check = args.skip_data_check or not first
    run.continue_with = CONTINUE_WITH
    for option, value in row.options.items():
        setattr(run, option, value)
    return run


def _run_dir(output: str, model: str) -> str:
    return os.path.join(output, model)


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_one(train: Callable, run_args, processes: ProcessContext, row: Row, seed: int) -> RunResult:
    """A row's run with one seed: reused when finished, resumed when interrupted, recorded when it collapses."""
    run_dir = _run_dir(run_args.output, run_args.model[0])
    collapsed = os.path.join(run_dir, COLLAPSED_FILE)
    if os.path.isfile(collapsed):
        return RunResult(row=row, seed=seed, status="collapsed", note=_read(collapsed)["message"])
    started = os.path.isfile(os.path.join(run_dir, "last.pth"))
    run_args.resume = started
    try:
        train(run_args, processes)
    except NothingLeftToDo:
        pass  # finished by an earlier call, with the same settings (checked as --resume checks them)
    except NonFiniteLoss as error:
        if processes.is_main:
            os.makedirs(run_dir, exist_ok=True)
            with open(collapsed, "w") as f:
                json.dump(dict(message=str(error)), f)
        return RunResult(row=row, seed=seed, status="collapsed", note=str(error))
    barrier(processes)  # the main process writes result.json when the run ends
    result_path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.isfile(result_path):
        raise UserError(f"{run_dir} was stopped before it finished; run the same hafa ablate again to resume it")
    result = _read(result_path)
    return RunResult(
        row=row,
        seed=seed,
        status="finished",
        metrics=result["best_metrics"] or {},
        best_epoch=result["best_epoch"],
        checkpoint=result["best_checkpoint"],
    )


# ---------------------------------------------------------------- what each row costs


def row_costs(model: str, rows: list[Row], img_size: int, device: torch.device, reps: int = 5) -> dict[str, dict]:
    """Parameters (M) and batch-1 latency relative to the conv-conv-conv model of each row's backbone,
    timed interleaved in this process (median of `reps`)."""
    torch.manual_seed(0)
    options = {row.name: row.options for row in rows}
    options.setdefault(BASELINE_ROW, dict(stage_aggregation=list(BASELINE_AGGREGATION)))
    models = {
        name: sized_model(model, img_size, HafaOptions.of(chosen), num_classes=0).to(device).eval()
        for name, chosen in options.items()
    }
    images = torch.randn(1, 3, img_size, img_size, device=device)

    def call(network):
        with torch.inference_mode():
            network(images)

    timings = interleaved_timings({name: partial(call, m) for name, m in models.items()}, device, 2, reps)
    base = timings[BASELINE_ROW].median_ms
    return {
        name: dict(
            params_m=sum(p.numel() for p in models[name].parameters()) / 1e6,
            latency_ms=timings[name].median_ms,
            latency_ratio=timings[name].median_ms / base,
        )
        for name in (row.name for row in rows)
    }


# ---------------------------------------------------------------- the result


def _summary(runs: list[RunResult], metric: str) -> tuple[float | None, float | None, list]:
    values = [r.metrics.get(metric) for r in runs if r.status == "finished" and r.metrics.get(metric) is not None]
    if not values:
        return None, None, values
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), values


def write_csv(path: str, results: list[RunResult], metrics: tuple[str, ...]) -> None:
    options = sorted({key for r in results for key in r.row.options})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", *options, "seed", "status", *metrics, "best_epoch", "checkpoint"])
        for r in results:
            settings = [json.dumps(r.row.options.get(key)) if key in r.row.options else "" for key in options]
            scores = ["" if r.metrics.get(m) is None else r.metrics[m] for m in metrics]
            writer.writerow([r.row.name, *settings, r.seed, r.status, *scores, r.best_epoch or "", r.checkpoint or ""])


def paper_figures(study: str, task: str, model: str) -> tuple[dict, str | None]:
    """The paper's figures for a study of `model` and the caption that says whose they are: none unless
    the model is of the family the paper ran the study on (None, None where the paper has no figure)."""
    paper = PAPER.get((study, task), {})
    if not paper:
        return {}, None
    family = family_of_model(model)
    if family != PAPER_FAMILIES[study]:
        return {}, (
            f"Paper: the paper ran this study on {PAPER_SOURCES[study]}, a {PAPER_FAMILIES[study]} model; "
            f"{model} is a {family} model, so its figures are left out."
        )
    return paper, (
        f"Paper: {PAPER_SOURCES[study]}, full-scale runs, not comparable in value with a short run; "
        "compare the order of the rows."
    )


def markdown(args, rows: list[Row], results: list[RunResult], metrics: tuple[str, ...], costs: dict) -> str:
    paper, caption = paper_figures(args.study, args.task, args.model_name)
    metric = metrics[0]
    lines = [
        f"# hafa ablate {args.study}: {args.model_name} on {args.data_name} ({args.task})",
        "",
        f"Seeds {', '.join(str(s) for s in args.seed_list)}; every run is an ordinary training run in {args.output}. "
        f"{metric}: the best validation value of each run (%), mean ± s.d. over the seeds that finished.",
        "",
        f"| row | {metric} mean ± s.d. | each seed | "
        + "".join(f"{m} mean | " for m in metrics[1:])
        + "params (M) | latency vs conv-conv-conv | paper |",
        "|---|---:|---|" + "---:|" * len(metrics[1:]) + "---:|---:|---|",
    ]
    for row in rows:
        runs = [r for r in results if r.row == row]
        mean, spread, _ = _summary(runs, metric)
        seeds = ", ".join(
            f"{r.seed}: collapsed"
            if r.status == "collapsed"
            else f"{r.seed}: {'-' if r.metrics.get(metric) is None else format_metric(metric, r.metrics[metric])}"
            for r in runs
        )
        shown = "collapsed" if mean is None else f"{format_metric(metric, mean)} ± {spread:.2f}"
        others = "".join(
            f"{'-' if (m := _summary(runs, other)[0]) is None else format_metric(other, m)} | " for other in metrics[1:]
        )
        cost = costs[row.name]
        lines.append(
            f"| {row.name} | {shown} | {seeds} | {others}{cost['params_m']:.2f} | "
            f"{cost['latency_ratio']:.2f} | {paper.get(row.name, '-')} |"
        )
    lines += [
        "",
        f"Latency: the backbone at batch 1, {args.img_size} px, on {args.device_name}, median of 5, timed "
        "interleaved with the conv-conv-conv model in one process.",
    ]
    if caption:
        lines.append(caption)
    collapsed = [r for r in results if r.status == "collapsed"]
    for r in collapsed:
        lines.append(f"- {r.row.name}, seed {r.seed}: collapsed ({r.note.split(';')[0]})")
    return "\n".join(lines) + "\n"


def draw(path: str, rows: list[Row], results: list[RunResult], metric: str, title: str) -> None:
    """A dot per seed, the mean (a bar) and ± s.d. (whiskers) per row; collapsed runs as crosses at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows)), 3.8))
    finished = [r.metrics[metric] for r in results if r.status == "finished" and r.metrics.get(metric) is not None]
    bottom = min(finished) if finished else 0.0
    for x, row in enumerate(rows):
        runs = [r for r in results if r.row == row]
        mean, spread, values = _summary(runs, metric)
        ax.scatter([x] * len(values), values, color="tab:blue", s=18, zorder=3)
        if mean is not None:
            ax.errorbar([x], [mean], yerr=[spread], fmt="_", color="black", markersize=18, capsize=4, zorder=2)
        crashes = sum(r.status == "collapsed" for r in runs)
        if crashes:
            ax.scatter([x] * crashes, [bottom] * crashes, marker="x", color="tab:red", zorder=3, label="collapsed")
    ax.set_xticks(range(len(rows)), [row.name for row in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"best val {metric} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command


def _study_of_results(output: str) -> dict | None:
    """The study whose results an output folder holds: ablation.json, or the title of an ablation.md
    written before it (None when the folder holds no result)."""
    path = os.path.join(output, STUDY_FILE)
    if os.path.isfile(path):
        try:
            held = _read(path)
        except (OSError, ValueError) as error:
            raise UserError(f"{path} cannot be read ({error}); it says which study {output} holds") from None
        if not (isinstance(held, dict) and all(isinstance(held.get(key), str) for key in ("study", "task", "model"))):
            raise UserError(f"{path} does not say which study {output} holds (study, task, model)")
        return {key: held[key] for key in ("study", "task", "model")}
    table = os.path.join(output, RESULT_FILES[0])
    if not os.path.isfile(table):
        return None
    with open(table) as f:
        match = re.match(r"# hafa ablate (\S+): (\S+) on .* \((\w+)\)$", f.readline().strip())
    if match is None:
        raise UserError(f"{output} holds an {RESULT_FILES[0]} of a study it does not name; choose another --output")
    return dict(study=match[1], model=match[2], task=match[3])


def claim_output(output: str, study: str, task: str, model: str, processes: ProcessContext) -> None:
    """An output folder holds one study of one model: one that holds another's results (ablation.md,
    .csv and .png) is refused, as a changed option is; a new one is marked as this study's."""
    this = dict(study=study, task=task, model=model)
    held = _study_of_results(output)
    if held is not None and held != this:
        raise UserError(
            f"--output {output} holds the {held['study']} study of {held['model']} ({held['task']}); the {study} "
            f"study of {model} ({task}) would overwrite its {', '.join(RESULT_FILES)}: choose another --output"
        )
    if held is None and processes.is_main:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, STUDY_FILE), "w") as f:
            json.dump(this, f)


def _job(args, processes: ProcessContext) -> int:
    module_name, extra = TASKS[args.task]
    task = importlib.import_module(module_name).TASK
    metric = task.score
    rows = [row for row in study_rows(args.study, args.values) if args.rows is None or row.name in args.rows]
    seeds = _check(args, rows)
    model = args.model[0] if args.model else DEMO_MODELS[0]
    default = f"{args.study}-{args.task}" + ("" if model == DEMO_MODELS[0] else f"-{model}")
    output = args.output or OutputDir().check(os.path.join("runs", "ablate", default), "--output")
    claim_output(output, args.study, args.task, model, processes)
    results = []
    first = True
    for row in rows:
        for seed in seeds:
            run_output = os.path.join(output, row.name, f"seed{seed}")
            run_args = _run_args(args, row, seed, run_output, model, first)
            results.append(run_one(partial(train_job, task), run_args, processes, row, seed))
            first = False
    if not processes.is_main:
        return 0
    device = processes.device
    img_size = _input_side(results, args.task)
    costs = row_costs(model, rows, img_size, device)
    metrics = (metric, *extra)
    summary = argparse.Namespace(
        study=args.study,
        task=args.task,
        model_name=model,
        data_name=getattr(args, "data", None) or getattr(args, "images", None) or "the embedded data",
        seed_list=seeds,
        output=output,
        img_size=img_size,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
    )
    text = markdown(summary, rows, results, metrics, costs)
    with open(os.path.join(output, "ablation.md"), "w") as f:
        f.write(text)
    write_csv(os.path.join(output, "ablation.csv"), results, metrics)
    draw(os.path.join(output, "ablation.png"), rows, results, metric, f"hafa ablate {args.study}: {model}")
    print(text)
    print(f"wrote {os.path.join(output, 'ablation.md')}, ablation.csv and ablation.png")
    return 0


def _input_side(results: list[RunResult], task: str) -> int:
    """The input side the runs trained at (the latency is timed there): from a finished run's recipe."""
    for r in results:
        if r.checkpoint and os.path.isfile(r.checkpoint):
            recipe = read_saved(r.checkpoint, task, "hafa ablate").settings["recipe"]
            for key in ("img_size", "crop_size", "min_size"):
                if key in recipe:
                    side = recipe[key]
                    return side[0] if isinstance(side, list) else side
    return 224


def run(args) -> int:
    if args.values is not None:
        if args.study not in VALUES:
            raise UserError(f"--values is for the cluster-ratio and knn-k studies, not {args.study}")
        texts, args.values = args.values, VALUES[args.study].parse_items(args.values, "--values")
        names = [row.name for row in study_rows(args.study, args.values)]
        repeated = sorted({name for name in names if names.count(name) > 1}, key=names.index)
        if repeated:
            raise UserError(
                f"--values {' '.join(texts)}: each value once ({', '.join(repeated)} given more than once; "
                "values are told apart by their first 6 digits)"
            )
    if args.rows is not None:
        known = {row.name.lower(): row.name for row in study_rows(args.study, args.values)}
        unknown = [name for name in args.rows if name.lower() not in known]
        if unknown:
            raise UserError(
                f"--rows {' '.join(unknown)}: the {args.study} study's rows are {', '.join(known.values())}"
            )
        args.rows = [known[name.lower()] for name in args.rows]
    return run_in_processes(_job, args)


__all__ = ["add_arguments", "run", "study_rows", "STUDIES"]
