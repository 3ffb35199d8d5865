"""`hafa bench`: each HAFA model beside its baseline, measured in one process.

Figures: parameters; MACs (tools.flops.count_macs: clustering, bilinear sampling and merging by
formula); the aten operators that launch a kernel in one forward at the small batch (what bounds a
GPU's latency there); inference latency at a small batch; forward time (and throughput) at a large
batch; one training step at the large batch (forward, cross-entropy, backward, AdamW step); peak memory
of that forward and of that step (timing).

`hafa bench --modules`: LAA and SIA against the plain downsampling they replace, and where a HAFA
backbone's forward time goes at the detection size (modules).

`hafa bench --cost`: kernel launches, bytes and FLOPs of a forward and a training step on a GPU's code
path, counted on this machine with fake CUDA tensors (cost).

The tables, ratios and goals are in report; the command's options and what they run are here.
"""

import importlib.util
import os

import torch

from ...errors import UserError, unknown_name
from ...models.table import BASELINE
from ...progress import progress
from ...spec import Choice, Device, Values, Whole, add_json_option, add_setting, write_json
from ...tasks.run_settings import image_side
from . import report
from .cost import KERNELS, cost_rows
from .modules import forward_breakdown, measure_transitions, time_sia_ops
from .report import TARGET_PAIRS
from .timing import (
    AMP_DTYPES,
    CLOCKS,
    COMPILE_MODES,
    DETECTION_BATCH,
    DETECTION_SIZE,
    GPU_COMPILE_MODES,
    BenchConfig,
    Timing,
    count_operators,
    interleaved_timings,
    measure_models,
    peak_memory_mb,
)

DEFAULT_MODELS = [
    "hafa_pvt_tiny",
    "hafa_pvt_v2_b0",
    "hafa_pvt_v2_b1",
    "hafa_pvt_v2_b2",
    "hafa_swin_tiny_patch4_window7_224",
]


def add_arguments(parser):
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="HAFA_MODEL",
        help="HAFA models, each measured beside its baseline (default: the tiny / b0 / b1 / b2 / Swin-T sizes; "
        "with --cost the three target pairs, tiny / b1 / Swin-T)",
    )
    add_setting(parser, "--img-size", setting=image_side(224), help="square input size")
    add_setting(
        parser,
        "--batch-sizes",
        setting=Values([1, 32], item=Whole(low=1), length=2),
        metavar=("LATENCY", "THROUGHPUT"),
        help="batch for latency, and for throughput and the training step",
    )
    add_setting(parser, "--reps", setting=Whole(5, low=1), help="timed repetitions of each measurement")
    add_setting(parser, "--warmup", setting=Whole(2, low=0), help="untimed runs before them")
    add_setting(parser, "--device", setting=Device("auto", auto=True), help="auto: cuda when present")
    add_setting(parser, "--threads", setting=Whole(None, low=1, optional=True), help="torch CPU threads")
    add_setting(
        parser,
        "--clock",
        setting=Choice("wall", choices=tuple(CLOCKS)),
        help="wall time, or the process's CPU time: with --threads 1 it barely feels other processes "
        "on a shared machine (CPU only)",
    )
    add_setting(
        parser,
        "--amp",
        setting=Choice("none", choices=tuple(AMP_DTYPES)),
        help="run forward passes under autocast in bf16 or fp16 (fp16: with loss scaling)",
    )
    add_setting(
        parser,
        "--compile",
        setting=Choice(None, choices=COMPILE_MODES, optional=True),
        help="time torch.compile(model, fullgraph=True, dynamic=False), for both models (inference and the "
        "training step): cudagraphs (CUDA graphs over the eager kernels: no launch cost, same arithmetic), or an "
        "inductor mode (default, reduce-overhead, max-autotune); also each compile's time and what a new input "
        "size costs. The operator count stays eager",
    )
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--quick", action="store_true", help="a quick look: 2 repetitions, 1 warm-up, batches 1 and 8")
    parser.add_argument(
        "--modules",
        action="store_true",
        help="time LAA and SIA against the plain downsampling, and SIA's share of the backbone at 800x1333",
    )
    add_setting(
        parser,
        "--detection-size",
        setting=Values(list(DETECTION_SIZE), item=image_side(), length=2),
        metavar=("H", "W"),
        help="--modules: the detection input, batch 2 (800 1333: 4200 stage-3 tokens)",
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="count instead of timing: kernel launches, bytes read + written and FLOPs of a forward and a "
        "training step on a GPU's code path, with fake CUDA tensors (runs on a CPU; docs/gpu.md)",
    )
    add_setting(
        parser,
        "--cost-batch-sizes",
        setting=Values([1, 64], item=Whole(low=1), length=2),
        metavar=("FORWARD", "TRAIN"),
        help="--cost: the batch of the forward, and of the training step",
    )
    add_setting(
        parser,
        "--kernels",
        setting=Choice(None, choices=KERNELS, optional=True),
        help="--cost only: HAFA's operations as the PyTorch path or as the Triton kernels (hafa.ops.use_kernels); "
        "default torch",
    )
    add_json_option(parser, "everything measured (--cost: a list of rows)")


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda when present), or what every command takes (cpu, cuda, cuda:N)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(Device().check(name, "--device"))


def run(args) -> int:
    models = args.models or (list(report.TARGET_PAIRS) if args.cost else DEFAULT_MODELS)
    for name in models:
        if name not in BASELINE:
            raise unknown_name("HAFA model", name, sorted(BASELINE))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        if args.modules or args.compile:
            raise UserError("--cost counts whole models, eagerly: leave out --modules and --compile")
        return _run_cost(models, args)
    if args.kernels is not None:
        raise UserError(
            f"--kernels {args.kernels} chooses the kernels the --cost model counts; the timings run what "
            "hafa.ops.use_kernels chooses on the device (auto): add --cost, or leave --kernels out"
        )
    reps, warmup, batch_sizes = args.reps, args.warmup, tuple(args.batch_sizes)
    if args.quick:
        reps, warmup, batch_sizes = 2, 1, (batch_sizes[0], min(batch_sizes[1], 8))
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep torch.profiler's start-up chatter off the screen
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise UserError("--clock cpu measures CPU time: use it with --device cpu")
    if args.amp == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU; use bf16 on CPU")
    if args.compile in GPU_COMPILE_MODES and device.type == "cpu":
        raise UserError(
            f"--compile {args.compile} captures CUDA graphs: it needs a GPU (on CPU: default or max-autotune)"
        )
    if args.compile and args.modules:
        raise UserError("--compile times whole models: leave out --modules")
    config = BenchConfig(
        models=models,
        device=device,
        img_size=args.img_size,
        batch_sizes=batch_sizes,
        reps=reps,
        warmup=warmup,
        clock=args.clock,
        amp=args.amp,
        compile=args.compile,
        train=not args.no_train,
        memory=not (args.no_memory or args.compile),
        detection_size=tuple(args.detection_size),
    )
    result = dict(settings=report.settings(config))
    print(
        f"device {result['settings']['device']} ({result['settings']['device_name']}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, autocast {config.amp}; "
        f"{result['settings']['clock']}, median ± half the interquartile range of {reps} "
        f"interleaved runs after {warmup} warm-up"
    )
    if config.compile:
        print(
            f"compiled ({config.compile}, static shapes; each first run compiles and is timed on its own); "
            "no memory figures (a compiled model's memory is not the eager model's)"
        )
    result.update(_run_modules(config) if args.modules else _run_models(config))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _run_models(config: BenchConfig) -> dict:
    """Each HAFA model beside its baseline: rows, ratios, and the goals of the device."""
    names = [n for name in config.models for n in (BASELINE[name], name)]
    rows = measure_models(names, config)
    for row in rows:
        row["paper"] = report.paper_figures(row["model"])
    by_name = {r["model"]: r for r in rows}
    ratios = [report.pair_ratios(by_name[name], by_name[BASELINE[name]]) for name in config.models]
    print(report.models_markdown(rows, ratios, config))
    if config.compile:
        print("\n" + report.compile_markdown(rows, config))
    key = report.target_key(config)
    lines = report.target_lines(ratios, key)
    if lines:
        print(f"\nHAFA / baseline against this project's goals ({key}):")
        print("\n".join(lines))
    return dict(models=rows, ratios=ratios)


def _run_modules(config: BenchConfig) -> dict:
    """LAA and SIA against the baseline's downsampling, SIA's operations, and (on CPU) the backbones' profiles."""
    runs = (len(config.models) * 3 * 3 + 4) * (config.warmup + config.reps)
    with progress(total=runs, desc="layers", unit="run") as bar:
        rows = [row for name in config.models for row in measure_transitions(name, config, bar)]
        ops = time_sia_ops(config, bar)
    breakdowns = []
    if config.device.type == "cpu":
        breakdowns = [
            forward_breakdown(name, config.detection_size, DETECTION_BATCH)
            for name in progress(config.models, desc="backbone profiles")
        ]
    print(report.modules_markdown(rows, breakdowns, ops))
    if breakdowns:
        print("\n".join(report.sia_share_lines(breakdowns, config.detection_size, DETECTION_BATCH)))
    return dict(layers=rows, sia_ops=ops, backbones=breakdowns)


def _run_cost(models: list[str], args) -> int:
    """The cost model's rows for each HAFA model and its baseline, their tables and the cost goals."""
    forward_batch, train_batch = args.cost_batch_sizes
    args.kernels = args.kernels or "torch"
    if args.kernels == "triton" and importlib.util.find_spec("triton") is None:
        raise UserError("--kernels triton needs the triton package (pip install triton); no GPU is needed")
    print(
        f"cost model: fake CUDA tensors on this machine (no GPU, nothing timed), torch {torch.__version__}, "
        f"kernels {args.kernels}; launches: operators that launch a kernel; MB: their inputs' and outputs' "
        "bytes; GFLOP: matmuls, convolutions, attention and HAFA's sampling, top-k, sorts and scatters"
    )
    with progress(total=2 * len(models), desc="counting", unit="model") as bar:
        rows = cost_rows(models, forward_batch, train_batch, args.img_size, args.kernels, bar)
    print(report.cost_markdown(rows))
    lines = report.cost_target_lines(rows)
    if lines:
        print("\n" + report.cost_goal_note(rows))
        print("\n".join(lines))
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


__all__ = ["add_arguments", "run", "TARGET_PAIRS", "Timing", "count_operators", "interleaved_timings", "peak_memory_mb"]
