"""`hafa bench --modules`: LAA and SIA against the plain downsampling they replace, at the stage sizes of
classification and of 800 x 1333 detection; SIA's own operations at the detection size; and where a
HAFA backbone's CPU forward time goes there (torch.profiler: SIA, of which clustering and merging, the
dictionary, LAA)."""

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ...layers import BASELINE_AGGREGATION, LAA, LAA_LAYERS, SIA, DeformableConv2d, LAAPatchMerging
from ...ops import cluster_dpc_knn, clustering, map2token, merge, merge_tokens, token2map, token_map
from .report import ratio
from .timing import DETECTION_BATCH, BenchConfig, interleaved_timings, synchronize


def transition_names(model: nn.Module) -> list[str]:
    """The names of a HAFA model's LAA and SIA layers, transition 1->2 first (the baseline's downsampling
    has the same name: a conversion keeps the model's names)."""
    return [name for name, module in model.named_modules() if isinstance(module, (*LAA_LAYERS, SIA))]


def layer_calls(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, Callable]:
    """name -> a call of that layer of `model` on the input a forward pass of `images` gives it."""
    calls = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[name] = partial(module, *args, **kwargs)

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(keep(name), with_kwargs=True) for name in names]
    try:
        model.forward_intermediates(images, intermediates_only=True)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def stage_shapes(name: str, size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(C, H, W) of each stage's output for an image of `size`, computed on the meta device (no arithmetic)."""
    with torch.device("meta"):
        model = timm.create_model(name, stage_aggregation=BASELINE_AGGREGATION)
        maps = model.forward_intermediates(torch.empty(1, 3, *size), intermediates_only=True)
    return [tuple(m.shape[1:]) for m in maps]


def measure_transitions(name: str, config: BenchConfig, bar) -> list[dict]:
    """Each HAFA transition (LAA, LAA, SIA) against the baseline's downsampling, on the stage inputs of
    random images."""
    device = config.device
    torch.manual_seed(0)
    hafa = timm.create_model(name).to(device).eval()
    baseline = timm.create_model(name, stage_aggregation=BASELINE_AGGREGATION).to(device).eval()
    size = config.img_size
    settings_ = [(f"{size}x{size}", (size, size), b) for b in config.batch_sizes]
    height, width = config.detection_size
    settings_.append((f"{height}x{width}", (height, width), DETECTION_BATCH))
    models = {"hafa": hafa, "baseline": baseline}
    names = transition_names(hafa)
    rows = []
    for label, size, batch in settings_:
        shapes = stage_shapes(name, size)
        images = torch.randn(batch, 3, *size, device=device)
        with torch.inference_mode(), config.autocast():
            calls = {k: layer_calls(m, names, images) for k, m in models.items()}
        for i, layer in enumerate(names, start=1):
            channels, height, width = shapes[i - 1]
            with torch.inference_mode(), config.autocast():
                timings = interleaved_timings(
                    {k: calls[k][layer] for k in models},
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
                    layer=type(hafa.get_submodule(layer)).__name__,
                    baseline_layer=type(baseline.get_submodule(layer)).__name__,
                    tokens=f"{height}x{width}x{channels}",
                    hafa=asdict(timings["hafa"]),
                    baseline=asdict(timings["baseline"]),
                    ratio=ratio(timings["hafa"].median_ms, timings["baseline"].median_ms),
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
    torch.manual_seed(0)
    model = timm.create_model(name).to(device).eval()
    images = torch.randn(batch, 3, *size, device=device)
    parts = {
        "sia": [SIA.forward],
        "clustering": [clustering.cluster_dpc_knn],
        "merging": [merge.merge_tokens],
        "dictionary": [token_map._paint_plan, token_map._paint, token_map._read_plan, token_map._read],
        "laa": [LAA.forward, LAAPatchMerging.forward, DeformableConv2d.forward],
    }
    labels = {part: tuple(_code_label(f) for f in functions) for part, functions in parts.items()}
    with torch.inference_mode():
        model.forward_features(images)  # warm-up
        synchronize(device)
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            start = time.perf_counter()
            model.forward_features(images)
            synchronize(device)
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


def time_sia_ops(config: BenchConfig, bar, channels: int = 320, cluster_ratio: float = 0.25, k: int = 5) -> dict:
    """SIA's own operations on the stage-3 tokens of a detection input (batch 2): DPC-KNN, merging,
    and a round trip through the dictionary to the stride-32 map and back, each timed on the device."""
    height, width = (-(-s // 16) for s in config.detection_size)
    num_tokens, num_clusters = height * width, math.ceil(cluster_ratio * height * width)
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
