"""Measuring: what to measure (BenchConfig), interleaved timings, peak memory, the operator counter, and
the models under measurement (Subject, measure_models).

Timings are interleaved: each repetition runs every call once in turn, so that a noisy machine slows all
of them alike; the median and half the interquartile range are reported. Memory on CUDA is
torch.cuda.max_memory_allocated over the call; on CPU it is the peak of live tensor bytes, replayed from
torch.profiler's allocation events (what the allocator hands out, independent of other processes; not
the process's RSS).
"""

import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from ...progress import progress
from ...tasks.networks import sized_model
from ..flops import count_macs

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("cudagraphs", "default", "reduce-overhead", "max-autotune")
GPU_COMPILE_MODES = ("cudagraphs", "reduce-overhead")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

DETECTION_SIZE = (800, 1333)
DETECTION_BATCH = 2


def compiled(model: nn.Module, mode: str | None) -> nn.Module:
    """torch.compile(model, fullgraph=True) in a --compile mode (None: the model itself)."""
    if mode is None:
        return model
    # dynamic=False: each batch size gets its own graph, as a deployment with a fixed batch would (and as
    # the task commands compile, hafa.compiled).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
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


def synchronize(device: torch.device) -> None:
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
    bar=None,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Run every call `warmup` times, then `reps` timed times, taking the calls in turn each round
    (bar: a hafa.progress bar, advanced once per run)."""
    seconds = {name: [] for name in calls}
    for round_index in range(warmup + reps):
        for name, call in calls.items():
            elapsed = _timed(call, device, clock)
            if round_index >= warmup:
                seconds[name].append(elapsed)
            if bar is not None:
                bar.update()
    return {name: Timing.of(s) for name, s in seconds.items()}


def peak_memory_mb(call: Callable[[], object], device: torch.device) -> float:
    """Peak of the tensor memory allocated during call() above what was allocated before it (MiB).

    CUDA: the caching allocator's own peak. CPU: the peak of the memory timeline that torch.profiler
    records from its allocation events (live tensor bytes, whatever other processes do; not RSS).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
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
_NO_KERNEL = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether a dispatched operator launches a kernel: not a view, an allocation or a query of a tensor's
    metadata (prim::device and the like, which fake tensors dispatch)."""
    return func.namespace != "prim" and not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL


def _has_composite_kernel(func: torch._ops.OpOverload) -> bool:
    return func.namespace == "aten" and torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), "CompositeImplicitAutograd"
    )


class OperatorCounter(TorchDispatchMode):
    """Counts the operators dispatched that launch a kernel (launches_kernel).

    decompose: count what an operator with a composite kernel runs (reshape: a view, or a copy; linear:
    a matmul; layer_norm: native_layer_norm) instead of the operator itself. Autograd decomposes them
    before they reach the counter in a training step; in inference mode they arrive whole.
    """

    def __init__(self, decompose: bool = False):
        super().__init__()
        self.decompose = decompose
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.decompose and _has_composite_kernel(func):
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        if launches_kernel(func):
            self.record(func, args, kwargs, out)
        return out

    def record(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out) -> None:
        """One operator that launches a kernel, with its inputs and outputs."""
        self.count += 1


def count_operators(call: Callable[[], object], decompose: bool = False) -> int:
    """How many aten operators that launch a kernel one call() dispatches: on a GPU at small batches each
    costs launch time whatever its size, so this count, more than the arithmetic, sets the latency."""
    with OperatorCounter(decompose) as counter:
        call()
    return counter.count


class Subject:
    """A model under measurement, with its inputs and its training step."""

    def __init__(self, name: str, config: BenchConfig, seed: int = 0):
        torch.manual_seed(seed)
        self.name = name
        self.config = config
        self.model = sized_model(name, config.img_size).to(config.device)
        self.compiled_model = compiled(self.model, config.compile)
        size = config.img_size
        self.images = {b: torch.randn(b, 3, size, size, device=config.device) for b in set(config.batch_sizes)}
        self.labels = torch.randint(0, self.model.num_classes, (config.batch_sizes[1],), device=config.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.scaler = torch.amp.GradScaler(config.device.type, enabled=config.amp == "fp16")

    def infer(self, batch: int, eager: bool = False, images: torch.Tensor | None = None) -> None:
        self.model.eval()
        with torch.inference_mode(), self.config.autocast():
            (self.model if eager else self.compiled_model)(self.images[batch] if images is None else images)

    def train_step(self) -> None:
        self.model.train()
        images = self.images[self.labels.shape[0]]
        with self.config.autocast():
            loss = F.cross_entropy(self.compiled_model(images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def graphs_compiled() -> int:
    """Graphs torch.compile has made in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def first_call(call: Callable[[], object], device: torch.device) -> dict:
    """A compiled call's first run: its wall time in seconds (compiling) and the graphs it made."""
    graphs, start = graphs_compiled(), time.perf_counter()
    call()
    synchronize(device)
    return dict(seconds=round(time.perf_counter() - start, 2), graphs=graphs_compiled() - graphs)


def takes_size(model: nn.Module, images: torch.Tensor) -> bool:
    """Whether the model (eager) takes images of this size: timm builds some baselines for one size only
    (Swin's patch embedding asserts it)."""
    model.eval()
    try:
        with torch.inference_mode():
            model(images)
    except AssertionError:
        return False
    return True


def measure_models(names: list[str], config: BenchConfig) -> list[dict]:
    """One row per model, in the order given; timings interleaved across all of them. Compiled models:
    each kind's first run (compiling) is timed on its own and left out of the timings, and after them one
    inference at another size (img_size + 32) shows what a new input size costs."""
    small, large = config.batch_sizes
    subjects = {n: Subject(n, config) for n in names}
    kinds = [("latency", lambda s: lambda: s.infer(small)), ("forward", lambda s: lambda: s.infer(large))]
    if config.train:
        kinds.append(("train_step", lambda s: s.train_step))
    rows = {n: dict(model=n) for n in names}
    if config.compile:
        with progress(total=len(kinds) * len(names), desc="compiling", unit="graph") as bar:
            for kind, make_call in kinds:
                for n, s in subjects.items():
                    rows[n].setdefault("compile", {})[kind] = first_call(make_call(s), config.device)
                    bar.update()
    with progress(total=len(kinds) * len(names) * (config.warmup + config.reps), desc="timing", unit="run") as bar:
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
    if config.compile:
        side = config.img_size + 32
        for n, s in progress(subjects.items(), desc=f"a new size, {side}"):
            images = torch.randn(small, 3, side, side, device=config.device)
            new_size = dict(img_size=side, seconds=None, graphs=None)  # None: the model takes one size only
            if takes_size(s.model, images):
                new_size.update(first_call(partial(s.infer, small, images=images), config.device))
            rows[n]["compile"]["new_size"] = new_size
    for n, s in progress(subjects.items(), desc="params, MACs, memory"):
        row = rows[n]
        # 6 places, so that the table's 2 are one rounding (at 3, 14.645324 M printed as 14.64)
        row["params_m"] = round(sum(p.numel() for p in s.model.parameters()) / 1e6, 6)
        row["gmacs"] = round(count_macs(s.model, (1, 3, config.img_size, config.img_size)) / 1e9, 3)
        row["operators"] = count_operators(partial(s.infer, small, eager=True))
        row["throughput_img_s"] = round(large / row["forward"]["median_ms"] * 1e3, 2)
        if config.memory:
            row["memory_mb"] = {"forward": round(peak_memory_mb(partial(s.infer, large), config.device), 1)}
            if config.train:
                row["memory_mb"]["train_step"] = round(peak_memory_mb(s.train_step, config.device), 1)
    return [rows[n] for n in names]
