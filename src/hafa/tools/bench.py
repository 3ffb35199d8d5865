"""`hafa bench`: each HAFA model beside its baseline, measured in one process.

Figures: parameters; MACs (tools.flops.count_macs: clustering, bilinear sampling and merging by
formula); the aten operators that launch a kernel in one forward at the small batch (what bounds a
GPU's latency there); inference latency at a small batch; forward time (and throughput) at a large batch; one
training step at the large batch (forward, cross-entropy, backward, AdamW step); peak memory of that
forward and of that step. Timings are interleaved: each repetition runs every model once in turn, so
that a noisy machine slows all of them alike; the median and half the interquartile range are
reported. Memory on CUDA is torch.cuda.max_memory_allocated over the call; on CPU it is the peak of
live tensor bytes, replayed from torch.profiler's allocation events (what the allocator hands out,
independent of other processes; not the process's RSS).

`hafa bench --modules`: LAA and SIA against the plain downsampling they replace, at the stage sizes
of classification and of 800 x 1333 detection, and where a HAFA backbone's forward time goes at the
detection size (torch.profiler: SIA, of which clustering and merging, and the dictionary).
"""

import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from ..errors import UserError, unknown_name
from ..models._base import BASELINE_AGGREGATION, run_downsample
from ..models.table import BASELINE, PAPER
from ..ops import TokenLayout
from ..spec import Choice, Values, Whole
from ..tasks.options import Device, add_json_option, add_setting, image_side
from .flops import count_macs

DEFAULT_MODELS = [
    "hafa_pvt_tiny",
    "hafa_pvt_v2_b0",
    "hafa_pvt_v2_b1",
    "hafa_pvt_v2_b2",
    "hafa_swin_tiny_patch4_window7_224",
]

# The paper's GPU latency at 224 (ms), Sec. 4.1 text ("Tiny: 7.0ms (+1.4)", ...) and Table 4 (RTX 3090).
# The baselines' are HAFA's less the "+x" the paper gives.
PAPER_LATENCY_MS = {
    "hafa_pvt_tiny": 7.0,
    "pvt_tiny": 5.6,
    "hafa_pvt_small": 11.0,
    "pvt_small": 9.5,
    "hafa_pvt_large": 24.8,
    "pvt_large": 23.5,
    "hafa_pvt_v2_b1": 16.3,
}

# This project's goals for HAFA / baseline at 224 on the three pairs: the most each time ratio may be
# (throughput: the least), on CPU and on a GPU.
TARGET_PAIRS = ("hafa_pvt_tiny", "hafa_pvt_v2_b1", "hafa_swin_tiny_patch4_window7_224")
TARGETS = {
    "cpu": {"latency": ("<=", 1.15), "forward": ("<=", 1.10), "train_step": ("<=", 1.15)},
    "cuda": {"latency": ("<=", 1.10), "throughput": (">=", 0.93), "train_step": ("<=", 1.10)},
}
SIA_SHARE_TARGET = 0.15

DETECTION_SIZE = (800, 1333)
DETECTION_BATCH = 2


def add_arguments(parser):
    parser.add_argument(
        "--models",
        nargs="+",
        default=DEFAULT_MODELS,
        metavar="HAFA_MODEL",
        help="HAFA models, each measured beside its baseline (default: the tiny / b0 / b1 / b2 / Swin-T sizes)",
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
        help="time inference of torch.compile(model, fullgraph=True), for both models: cudagraphs (CUDA "
        "graphs over the eager kernels: no launch cost, same arithmetic), or an inductor mode (default, "
        "reduce-overhead, max-autotune). The training step and the operator count stay eager",
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
    add_json_option(parser, "everything measured")


# --- measuring -------------------------------------------------------------------------------------


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("cudagraphs", "default", "reduce-overhead", "max-autotune")
GPU_COMPILE_MODES = ("cudagraphs", "reduce-overhead")


def compiled(model: nn.Module, mode: str | None) -> nn.Module:
    """torch.compile(model, fullgraph=True) in a --compile mode (None: the model itself)."""
    if mode is None:
        return model
    # dynamic=False: each batch size gets its own graph, as a deployment with a fixed batch would.
    if mode == "cudagraphs":
        return torch.compile(model, backend="cudagraphs", fullgraph=True, dynamic=False)
    return torch.compile(model, mode=mode, fullgraph=True, dynamic=False)


@dataclass
class BenchConfig:
    """What to measure and how (the command line's values)."""

    models: list[str]
    device: torch.device
    img_size: int = 224
    batch_sizes: tuple[int, int] = (1, 32)
    reps: int = 5
    warmup: int = 2
    clock: str = "wall"
    amp: str = "none"
    compile: str | None = None
    train: bool = True
    memory: bool = True
    detection_size: tuple[int, int] = DETECTION_SIZE

    def autocast(self):
        dtype = AMP_DTYPES[self.amp]
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda when present), or what every command takes (cpu, cuda, cuda:N)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(Device().check(name, "--device"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of repeated runs: median and half the interquartile range (ms), and the samples."""

    median_ms: float
    spread_ms: float
    samples_ms: list[float]

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Timing":
        ms = [s * 1e3 for s in seconds]
        quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        spread = (quartiles[2] - quartiles[0]) / 2
        return cls(round(statistics.median(ms), 3), round(spread, 3), [round(m, 3) for m in ms])

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} ± {self.spread_ms:.1f}"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(call: Callable[[], object], device: torch.device, clock: str) -> float:
    """Seconds one call takes: CUDA events on a GPU (after synchronising), else the chosen clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    now = CLOCKS[clock]
    start = now()
    call()
    return now() - start


def interleaved_timings(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    reps: int,
    progress: tqdm | None = None,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Run every call `warmup` times, then `reps` timed times, taking the calls in turn each round."""
    seconds = {name: [] for name in calls}
    for round_index in range(warmup + reps):
        for name, call in calls.items():
            elapsed = _timed(call, device, clock)
            if round_index >= warmup:
                seconds[name].append(elapsed)
            if progress is not None:
                progress.update()
    return {name: Timing.of(s) for name, s in seconds.items()}


def peak_memory_mb(call: Callable[[], object], device: torch.device) -> float:
    """Peak of the tensor memory allocated during call() above what was allocated before it (MiB).

    CUDA: the caching allocator's own peak. CPU: the peak of the memory timeline that torch.profiler
    records from its allocation events (live tensor bytes, whatever other processes do; not RSS).
    """
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        _synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        call()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return max((sum(per_category) for per_category in sizes), default=0) / 2**20


# Operators that launch no kernel besides the views: reshape's relabelling and allocations.
_NO_KERNEL = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty"}


class _OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched, leaving out those that launch no kernel (views, allocations)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(call: Callable[[], object]) -> int:
    """How many aten operators that launch a kernel one call() dispatches: on a GPU at small batches each
    costs launch time whatever its size, so this count, more than the arithmetic, sets the latency."""
    with _OperatorCounter() as counter:
        call()
    return counter.count


class Subject:
    """A model under measurement, with its inputs and its training step."""

    def __init__(self, name: str, config: BenchConfig, seed: int = 0):
        torch.manual_seed(seed)
        self.name = name
        self.config = config
        self.model = timm.create_model(name).to(config.device)
        self.inference_model = compiled(self.model, config.compile)
        size = config.img_size
        self.images = {b: torch.randn(b, 3, size, size, device=config.device) for b in set(config.batch_sizes)}
        self.labels = torch.randint(0, self.model.num_classes, (config.batch_sizes[1],), device=config.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.scaler = torch.amp.GradScaler(config.device.type, enabled=config.amp == "fp16")

    def infer(self, batch: int, eager: bool = False) -> None:
        self.model.eval()
        with torch.inference_mode(), self.config.autocast():
            (self.model if eager else self.inference_model)(self.images[batch])

    def train_step(self) -> None:
        self.model.train()
        images = self.images[self.labels.shape[0]]
        with self.config.autocast():
            loss = F.cross_entropy(self.model(images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


# --- model mode ------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def measure_models(names: list[str], config: BenchConfig) -> list[dict]:
    """One row per model, in the order given; timings interleaved across all of them."""
    small, large = config.batch_sizes
    subjects = {n: Subject(n, config) for n in names}
    kinds = [("latency", lambda s: lambda: s.infer(small)), ("forward", lambda s: lambda: s.infer(large))]
    if config.train:
        kinds.append(("train_step", lambda s: s.train_step))
    rows = {n: dict(model=n) for n in names}
    with tqdm(
        total=len(kinds) * len(names) * (config.warmup + config.reps), desc="timing", unit="run", disable=None
    ) as bar:
        for kind, make_call in kinds:
            bar.set_postfix_str(kind)
            timings = interleaved_timings(
                {n: make_call(s) for n, s in subjects.items()},
                config.device,
                config.warmup,
                config.reps,
                bar,
                config.clock,
            )
            for n, timing in timings.items():
                rows[n][kind] = asdict(timing)
    for n, s in tqdm(subjects.items(), desc="params, MACs, memory", disable=None):
        row = rows[n]
        row["params_m"] = round(sum(p.numel() for p in s.model.parameters()) / 1e6, 3)
        row["gmacs"] = round(count_macs(s.model, (1, 3, config.img_size, config.img_size)) / 1e9, 3)
        row["operators"] = count_operators(partial(s.infer, small, eager=True))
        row["throughput_img_s"] = round(large / row["forward"]["median_ms"] * 1e3, 2)
        if config.memory:
            row["memory_mb"] = {"forward": round(peak_memory_mb(partial(s.infer, large), config.device), 1)}
            if config.train:
                row["memory_mb"]["train_step"] = round(peak_memory_mb(s.train_step, config.device), 1)
        paper = PAPER.get(n, (None, None, None))
        row["paper"] = dict(params_m=paper[0], gflops=paper[1], top1=paper[2], gpu_latency_ms=PAPER_LATENCY_MS.get(n))
    return [rows[n] for n in names]


def pair_ratios(hafa: dict, baseline: dict) -> dict:
    """HAFA / baseline for each figure (time ratios for the timings), ours and the paper's."""
    ratios = dict(
        model=hafa["model"],
        baseline=baseline["model"],
        params=_ratio(hafa["params_m"], baseline["params_m"]),
        gmacs=_ratio(hafa["gmacs"], baseline["gmacs"]),
        operators=_ratio(hafa["operators"], baseline["operators"]),
    )
    for kind in ("latency", "forward", "train_step"):
        if kind in hafa:
            ratios[kind] = _ratio(hafa[kind]["median_ms"], baseline[kind]["median_ms"])
    ratios["throughput"] = _ratio(hafa["throughput_img_s"], baseline["throughput_img_s"])
    for kind in hafa.get("memory_mb", {}):
        ratios[f"memory_{kind}"] = _ratio(hafa["memory_mb"][kind], baseline["memory_mb"][kind])
    ratios["paper"] = {
        key: _ratio(hafa["paper"][key], baseline["paper"][key]) for key in ("params_m", "gflops", "gpu_latency_ms")
    }
    return ratios


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def models_markdown(rows: list[dict], ratios: list[dict], config: BenchConfig) -> str:
    small, large = config.batch_sizes
    by_name = {r["model"]: r for r in rows}
    head = [
        "model",
        "params (M)",
        f"GMACs @{config.img_size}",
        f"ops b{small}",
        f"latency b{small} (ms)",
        f"forward b{large} (ms)",
        f"img/s b{large}",
    ]
    if config.train:
        head.append(f"train step b{large} (ms)")
    if config.memory:
        head += [f"peak mem forward b{large} (MB)"] + ([f"peak mem train b{large} (MB)"] if config.train else [])
    head += ["paper params (M)", "paper GFLOPs", "paper GPU latency (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]

    def figures(row: dict) -> list[str]:
        cells = [
            row["model"],
            _cell(row["params_m"], "{:.2f}"),
            _cell(row["gmacs"], "{:.2f}"),
            _cell(row["operators"]),
            str(Timing(**row["latency"])),
            str(Timing(**row["forward"])),
            _cell(row["throughput_img_s"], "{:.1f}"),
        ]
        if config.train:
            cells.append(str(Timing(**row["train_step"])))
        if config.memory:
            cells += [_cell(v, "{:.0f}") for v in row["memory_mb"].values()]
        paper = row["paper"]
        return cells + [_cell(paper["params_m"]), _cell(paper["gflops"]), _cell(paper["gpu_latency_ms"])]

    def ratio_cells(r: dict) -> list[str]:
        cells = ["**HAFA / baseline**"] + [
            _cell(r.get(k), "**{:.3f}**") for k in ("params", "gmacs", "operators", "latency", "forward")
        ]
        cells.append(_cell(r["throughput"], "{:.3f}"))
        if config.train:
            cells.append(_cell(r.get("train_step"), "**{:.3f}**"))
        if config.memory:
            cells += [_cell(r.get(f"memory_{k}"), "{:.3f}") for k in by_name[r["model"]]["memory_mb"]]
        return cells + [_cell(r["paper"][k], "{:.3f}") for k in ("params_m", "gflops", "gpu_latency_ms")]

    for r in ratios:
        for row in (by_name[r["baseline"]], by_name[r["model"]]):
            lines.append("| " + " | ".join(figures(row)) + " |")
        lines.append("| " + " | ".join(ratio_cells(r)) + " |")
    return "\n".join(lines)


def target_lines(ratios: list[dict], device_type: str) -> list[str]:
    """HAFA / baseline of the three target pairs against this project's goals for the device."""
    lines = []
    for r in ratios:
        if r["model"] not in TARGET_PAIRS:
            continue
        checks = []
        for kind, (relation, limit) in TARGETS[device_type].items():
            if r.get(kind) is not None:
                met = r[kind] <= limit if relation == "<=" else r[kind] >= limit
                checks.append(f"{kind} {r[kind]:.3f} ({relation} {limit}: {'met' if met else 'missed'})")
        lines.append(f"- {r['model']}: " + ", ".join(checks))
    return lines


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def settings(config: BenchConfig) -> dict:
    device = config.device
    return dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        timm=timm.__version__,
        img_size=config.img_size,
        batch_sizes=list(config.batch_sizes),
        reps=config.reps,
        warmup=config.warmup,
        clock="cuda events" if device.type == "cuda" else config.clock,
        amp=config.amp,
        compile=config.compile,
    )


# --- module mode -----------------------------------------------------------------------------------


def transition(stage: nn.Module) -> nn.Module:
    """The downsampling layer that opens a stage (PVT v1: patch_embed; PVT v2 and Swin: downsample)."""
    return stage.patch_embed if hasattr(stage, "patch_embed") else stage.downsample


def stage_shapes(name: str, size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(C, H, W) of each stage's output for an image of `size`, computed on the meta device (no arithmetic)."""
    with torch.device("meta"):
        model = timm.create_model(name, stage_aggregation=BASELINE_AGGREGATION)
        maps = model.forward_intermediates(torch.empty(1, 3, *size), intermediates_only=True)
    return [tuple(m.shape[1:]) for m in maps]


def measure_transitions(name: str, config: BenchConfig, bar: tqdm) -> list[dict]:
    """Each HAFA transition (LAA, LAA, SIA) against the baseline's downsampling, on random stage inputs."""
    device = config.device
    torch.manual_seed(0)
    hafa = timm.create_model(name).to(device).eval()
    baseline = timm.create_model(name, stage_aggregation=BASELINE_AGGREGATION).to(device).eval()
    size = config.img_size
    settings_ = [(f"{size}x{size}", (size, size), b) for b in config.batch_sizes]
    height, width = config.detection_size
    settings_.append((f"{height}x{width}", (height, width), DETECTION_BATCH))
    rows = []
    for label, size, batch in settings_:
        shapes = stage_shapes(name, size)
        for i in range(1, 4):
            channels, height, width = shapes[i - 1]
            tokens = torch.randn(batch, height * width, channels, device=device)
            layout = TokenLayout((height, width))
            modules = {"hafa": transition(hafa.stage_list[i]), "baseline": transition(baseline.stage_list[i])}
            with torch.inference_mode(), config.autocast():
                timings = interleaved_timings(
                    {k: partial(run_downsample, m, tokens, layout) for k, m in modules.items()},
                    device,
                    config.warmup,
                    config.reps,
                    bar,
                    config.clock,
                )
            rows.append(
                dict(
                    model=name,
                    input=label,
                    batch=batch,
                    transition=f"{i}->{i + 1}",
                    layer=type(modules["hafa"]).__name__,
                    baseline_layer=type(modules["baseline"]).__name__,
                    tokens=f"{height}x{width}x{channels}",
                    hafa=asdict(timings["hafa"]),
                    baseline=asdict(timings["baseline"]),
                    ratio=_ratio(timings["hafa"].median_ms, timings["baseline"].median_ms),
                )
            )
    return rows


def _code_label(function: Callable) -> str:
    """The end of torch.profiler's name for a Python function: 'file.py(first line): name'."""
    code = getattr(function, "__wrapped__", function).__code__
    return f"{os.path.basename(code.co_filename)}({code.co_firstlineno}): {code.co_name}"


def _union(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals."""
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def forward_breakdown(name: str, size: tuple[int, int], batch: int) -> dict:
    """Where one CPU forward of the backbone goes (torch.profiler's Python function events): total ms,
    and the share of SIA (whole module; of which clustering and merging), of the dictionary's
    token2map / map2token outside SIA, and of LAA. (On a GPU, Python spans time the launches, not the
    kernels: see time_sia_ops.)"""
    device = torch.device("cpu")
    from ..layers import LAA, SIA
    from ..models.swin import LAAPatchMerging
    from ..ops import clustering, merge, token_map

    torch.manual_seed(0)
    model = timm.create_model(name).to(device).eval()
    images = torch.randn(batch, 3, *size, device=device)
    parts = {
        "sia": [SIA.forward],
        "clustering": [clustering.cluster_dpc_knn],
        "merging": [merge.merge_tokens],
        "dictionary": [token_map._paint_plan, token_map._paint, token_map._read_plan, token_map._read],
        "laa": [LAA.forward, LAAPatchMerging.forward],
    }
    labels = {part: tuple(_code_label(f) for f in functions) for part, functions in parts.items()}
    with torch.inference_mode():
        model.forward_features(images)  # warm-up
        _synchronize(device)
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            start = time.perf_counter()
            model.forward_features(images)
            _synchronize(device)
            total_s = time.perf_counter() - start
    events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()]
    spans = {
        part: [(start, end) for name, start, end in events if name.endswith(part_labels)]
        for part, part_labels in labels.items()
    }
    total = max(end - start for name, start, end in events if name.endswith(": forward_features"))
    share = {part: round(_union(s) / total, 4) for part, s in spans.items()}
    sia_and_dictionary = _union(spans["sia"] + spans["dictionary"]) / total
    return dict(
        model=name,
        input=f"{size[0]}x{size[1]}",
        batch=batch,
        forward_ms=round(total_s * 1e3, 1),
        share=share,
        sia_with_dictionary=round(sia_and_dictionary, 4),
    )


def time_sia_ops(config: BenchConfig, bar: tqdm, channels: int = 320, ratio: float = 0.25, k: int = 5) -> dict:
    """SIA's own operations on the stage-3 tokens of a detection input (batch 2): DPC-KNN, merging,
    and a round trip through the dictionary to the stride-32 map and back, each timed on the device."""
    from ..ops import cluster_dpc_knn, map2token, merge_tokens, token2map

    height, width = (-(-s // 16) for s in config.detection_size)
    num_tokens, num_clusters = height * width, math.ceil(ratio * height * width)
    torch.manual_seed(0)
    tokens = torch.randn(DETECTION_BATCH, num_tokens, channels, device=config.device)
    scores = torch.randn(DETECTION_BATCH, num_tokens, device=config.device)
    ids, _ = cluster_dpc_knn(tokens, num_clusters, k=k)
    merged = merge_tokens(tokens, ids, num_clusters, scores)
    out_size = (-(-height // 2), -(-width // 2))

    def round_trip():
        map2token(token2map(merged, ids, (height, width), out_size), ids, (height, width), num_clusters)

    def all_three():
        cluster_ids, _ = cluster_dpc_knn(tokens, num_clusters, k=k)
        merged = merge_tokens(tokens, cluster_ids, num_clusters, scores)
        map2token(token2map(merged, cluster_ids, (height, width), out_size), cluster_ids, (height, width), num_clusters)

    calls = {
        "clustering": partial(cluster_dpc_knn, tokens, num_clusters, k=k),
        "merging": partial(merge_tokens, tokens, ids, num_clusters, scores),
        "dictionary": round_trip,
        "all": all_three,
    }
    with torch.inference_mode(), config.autocast():
        timings = interleaved_timings(calls, config.device, config.warmup, config.reps, bar, config.clock)
    return dict(
        tokens=f"{DETECTION_BATCH} x {num_tokens} x {channels}",
        clusters=num_clusters,
        **{name: asdict(t) for name, t in timings.items()},
    )


def modules_markdown(rows: list[dict], breakdowns: list[dict], ops: dict) -> str:
    lines = [
        "| model | input | batch | transition | HAFA layer (ms) | baseline layer (ms) | HAFA / baseline |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} ({r['tokens']} in) | {r['batch']} | {r['transition']} | "
            f"{r['layer']} {Timing(**r['hafa'])} | {r['baseline_layer']} {Timing(**r['baseline'])} | "
            f"**{r['ratio']:.2f}** |"
        )
    lines += [
        "",
        f"SIA's operations on {ops['tokens']} stage-3 tokens ({ops['clusters']} clusters), ms:",
        "",
        "| clustering | merging | dictionary round trip | all three |",
        "|---:|---:|---:|---:|",
        "| " + " | ".join(str(Timing(**ops[n])) for n in ("clustering", "merging", "dictionary", "all")) + " |",
    ]
    if not breakdowns:
        return "\n".join(lines)
    lines += [
        "",
        "| model | input, batch | forward (ms) | SIA + dictionary | SIA | clustering | merging "
        "| dictionary (outside SIA) | LAA |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in breakdowns:
        s = b["share"]
        lines.append(
            f"| {b['model']} | {b['input']}, {b['batch']} | {b['forward_ms']:.0f} | "
            f"**{b['sia_with_dictionary']:.1%}** | "
            f"{s['sia']:.1%} | {s['clustering']:.1%} | {s['merging']:.1%} | {s['dictionary']:.1%} | {s['laa']:.1%} |"
        )
    return "\n".join(lines)


# --- command ---------------------------------------------------------------------------------------


def run(args) -> int:
    for name in args.models:
        if name not in BASELINE:
            raise unknown_name("HAFA model", name, sorted(BASELINE))
    reps, warmup, batch_sizes = args.reps, args.warmup, tuple(args.batch_sizes)
    if args.quick:
        reps, warmup, batch_sizes = 2, 1, (batch_sizes[0], min(batch_sizes[1], 8))
    if args.threads:
        torch.set_num_threads(args.threads)
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
    if args.compile and warmup < 1:
        raise UserError("--compile needs --warmup 1 or more: the first run of each batch size compiles")
    config = BenchConfig(
        models=list(args.models),
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
    result = dict(settings=settings(config))
    print(
        f"device {result['settings']['device']} ({result['settings']['device_name']}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, autocast {config.amp}; "
        f"{result['settings']['clock']}, median ± half the interquartile range of {reps} "
        f"interleaved runs after {warmup} warm-up"
    )
    if config.compile:
        print(
            f"inference compiled ({config.compile}; the first warm-up run compiles), training step eager; "
            "no memory figures (a compiled model's memory is not the eager model's)"
        )
    if args.modules:
        with tqdm(
            total=(len(config.models) * 3 * 3 + 4) * (warmup + reps), desc="layers", unit="run", disable=None
        ) as bar:
            rows = [row for name in config.models for row in measure_transitions(name, config, bar)]
            ops = time_sia_ops(config, bar)
        breakdowns = []
        if device.type == "cpu":
            breakdowns = [
                forward_breakdown(name, config.detection_size, DETECTION_BATCH)
                for name in tqdm(config.models, desc="backbone profiles", disable=None)
            ]
        result.update(layers=rows, sia_ops=ops, backbones=breakdowns)
        print(modules_markdown(rows, breakdowns, ops))
        if breakdowns:
            print(
                "\nSIA + dictionary share of the backbone's forward at "
                f"{config.detection_size[0]}x{config.detection_size[1]}, batch {DETECTION_BATCH} "
                f"(goal < {SIA_SHARE_TARGET:.0%}; shares from torch.profiler, whose Python tracing adds "
                "a little to every Python call):"
            )
            for b in breakdowns:
                print(f"- {b['model']}: {b['sia_with_dictionary']:.1%}")
    else:
        names = [n for name in config.models for n in (BASELINE[name], name)]
        rows = measure_models(names, config)
        by_name = {r["model"]: r for r in rows}
        ratios = [pair_ratios(by_name[name], by_name[BASELINE[name]]) for name in config.models]
        result.update(models=rows, ratios=ratios)
        print(models_markdown(rows, ratios, config))
        lines = target_lines(ratios, device.type)
        if lines:
            print(f"\nHAFA / baseline against this project's {device.type.upper()} goals:")
            print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0
