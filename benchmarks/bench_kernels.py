"""The Triton kernels against the PyTorch path on a GPU, side by side in one process (CUDA events).

LAA (the whole layer: offsets, sampling, matmul, BatchNorm, GELU) forward and forward + backward at the
transitions of PVT-Tiny (2x2/s2) and PVT v2-B1 (3x3/s2/p1), batch 64, in float32 and under bfloat16
autocast; DPC-KNN at B=64, N=196, C=320 (classification) and B=2, N=4200, C=320 (detection). Each
repetition times the PyTorch path and then the kernels; the medians are compared. A ratio above 1 means
the kernels are faster: such rows are what hafa.ops.kernels.FASTER_WITH_TRITON records ("auto" then
takes the kernels there).

    python benchmarks/bench_kernels.py [--reps 20] [--warmup 5] [--json bench_kernels.json]
"""

import argparse
import importlib.util
import json
import math
import statistics

import torch

from hafa.layers import LAA
from hafa.ops import cluster_dpc_knn, use_kernels

MODES = ("torch", "triton")
# (model, in channels, out channels, kernel, stride, padding, input map side at 224 x 224)
LAA_CASES = [
    ("pvt_tiny stage 1->2", 64, 128, 2, 2, 0, 56),
    ("pvt_tiny stage 2->3", 128, 320, 2, 2, 0, 28),
    ("pvt_v2_b1 stage 1->2", 64, 128, 3, 2, 1, 56),
    ("pvt_v2_b1 stage 2->3", 128, 320, 3, 2, 1, 28),
]
DPC_CASES = [("classification", 64, 196, 320), ("detection", 2, 4200, 320)]
AMP = {"fp32": None, "bf16": torch.bfloat16}


def side_by_side_ms(run: dict, reps: int, warmup: int) -> dict:
    """Median CUDA milliseconds of run[mode]() for each mode, the modes interleaved in every repetition."""
    for _ in range(warmup):
        for fn in run.values():
            fn()
    torch.cuda.synchronize()
    times = {mode: [] for mode in run}
    for _ in range(reps):
        for mode, fn in run.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[mode].append(start.elapsed_time(end))
    return {mode: statistics.median(t) for mode, t in times.items()}


def in_mode(mode: str, fn):
    def run():
        with use_kernels(mode):
            return fn()

    return run


def laa_passes(laa: LAA, x: torch.Tensor, dtype: torch.dtype | None):
    """(inference forward, training forward + backward) of laa on x, under autocast to dtype if given."""

    def autocast():
        return torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None)

    def forward():
        with torch.no_grad(), autocast():
            return laa(x)

    def training_step():
        with autocast():
            out = laa(x.detach().requires_grad_())
        out.float().square().mean().backward()

    return forward, training_step


def bench_laa(batch: int, reps: int, warmup: int) -> list[dict]:
    rows = []
    for name, cin, cout, kernel, stride, padding, side in LAA_CASES:
        torch.manual_seed(0)
        laa = LAA(in_channels=cin, out_channels=cout, kernel_size=kernel, stride=stride, padding=padding).cuda()
        torch.nn.init.normal_(laa.offset.weight, std=0.05)  # non-zero offsets: real bilinear sampling
        for amp, dtype in AMP.items():
            # channels last, as a model's tokens reach its transitions (a view of B x N x C)
            tokens = torch.randn(batch, side * side, cin, device="cuda", dtype=dtype or torch.float32)
            x = tokens.transpose(1, 2).reshape(batch, cin, side, side)
            forward, training_step = laa_passes(laa, x, dtype)
            outputs = {mode: in_mode(mode, forward)().float() for mode in MODES}
            max_difference = float((outputs["torch"] - outputs["triton"]).abs().max())
            for passes, fn in (("forward", forward), ("forward+backward", training_step)):
                ms = side_by_side_ms({mode: in_mode(mode, fn) for mode in MODES}, reps, warmup)
                rows.append(
                    dict(
                        kernel="laa",
                        case=name,
                        dtype=amp,
                        passes=passes,
                        batch=batch,
                        size=x.numel(),
                        torch_ms=ms["torch"],
                        triton_ms=ms["triton"],
                        ratio=ms["torch"] / ms["triton"],
                        max_output_difference=max_difference,
                    )
                )
    return rows


def bench_dpc_knn(reps: int, warmup: int) -> list[dict]:
    rows = []
    for name, batch, tokens, channels in DPC_CASES:
        x = torch.randn(batch, tokens, channels, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        num_clusters = math.ceil(tokens / 4)
        run = {mode: in_mode(mode, lambda x=x, m=num_clusters: cluster_dpc_knn(x, m, k=5)) for mode in MODES}
        results = {mode: fn() for mode, fn in run.items()}
        same = all(torch.equal(a, b) for a, b in zip(results["torch"], results["triton"]))
        ms = side_by_side_ms(run, reps, warmup)
        rows.append(
            dict(
                kernel="dpc_knn",
                case=f"{name} B={batch} N={tokens} C={channels}",
                dtype="fp32",
                passes="forward",
                batch=batch,
                size=tokens,
                torch_ms=ms["torch"],
                triton_ms=ms["triton"],
                ratio=ms["torch"] / ms["triton"],
                same_clusters=same,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="LAA's batch")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "bench_kernels.py times the Triton kernels on a GPU, and there is no CUDA device here\n")
    if importlib.util.find_spec("triton") is None:
        parser.exit(2, "bench_kernels.py needs the triton package\n")
    torch.backends.cuda.matmul.allow_tf32 = False  # the PyTorch path's DPC-KNN in float32, as the kernel
    capability = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()} (capability {capability}), torch {torch.__version__}")
    rows = bench_laa(args.batch, args.reps, args.warmup) + bench_dpc_knn(args.reps, args.warmup)
    print(f"{'kernel':8} {'case':40} {'dtype':5} {'passes':17} {'torch ms':>9} {'triton ms':>9} {'ratio':>6}  check")
    for r in rows:
        check = (
            f"max |diff| {r['max_output_difference']:.1e}"
            if r["kernel"] == "laa"
            else ("same clusters" if r["same_clusters"] else "DIFFERENT CLUSTERS")
        )
        print(
            f"{r['kernel']:8} {r['case']:40} {r['dtype']:5} {r['passes']:17} "
            f"{r['torch_ms']:9.3f} {r['triton_ms']:9.3f} {r['ratio']:6.2f}  {check}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(device=torch.cuda.get_device_name(), capability=capability, torch=torch.__version__, results=rows),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
