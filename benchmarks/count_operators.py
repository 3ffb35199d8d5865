"""Kernel-launching operators in one forward, HAFA beside its baseline, as `hafa bench` counts them (`ops b1`:
operators as dispatched, a composite one counted once), on real CPU tensors on the fixed-shape path that a
GPU takes (every token scanned for DPC-KNN's relative distance), by part (the cost model's parts: where in
the source each operator is called from). `hafa bench --cost` counts the GPU's own path with fake CUDA
tensors, composite operators decomposed, for a training step too.

    python benchmarks/count_operators.py [--models hafa_pvt_tiny ...] [--img-size 224] [--batch 1]
"""

import argparse

import torch

import hafa  # noqa: F401  (registers the models)
from hafa.models.table import BASELINE
from hafa.ops import clustering
from hafa.tasks.networks import sized_model
from hafa.tools.bench import TARGET_PAIRS
from hafa.tools.bench.cost import PARTS, CostCounter, SourceParts


def operators_by_part(model: torch.nn.Module, x: torch.Tensor, parts: SourceParts) -> dict[str, int]:
    """Operators of one warm forward (what is kept between forwards already built), in all and by part."""
    with torch.inference_mode():
        model(x)
        with CostCounter(parts, decompose=False) as counter:
            model(x)
    return {"forward": counter.cost.total.launches, **{p: c.launches for p, c in counter.cost.parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TARGET_PAIRS), help="HAFA models (with their baselines)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    clustering._scans_every_token = lambda x: True  # the GPU's path, on CPU
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    parts = SourceParts()
    hafa_parts = [p for p in PARTS if p != "rest"]
    print(f"batch {args.batch}, {args.img_size} x {args.img_size}, torch {torch.__version__}\n")
    print(
        "| model | operators | baseline | HAFA / baseline | " + " | ".join(f"of which {p}" for p in hafa_parts) + " |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(hafa_parts))
    for name in args.models:
        ours = operators_by_part(sized_model(name, args.img_size).eval(), x, parts)
        baseline = operators_by_part(sized_model(BASELINE[name], args.img_size).eval(), x, parts)["forward"]
        print(
            f"| {name} | {ours['forward']} | {baseline} | {ours['forward'] / baseline:.2f} | "
            + " | ".join(str(ours[p]) for p in hafa_parts)
            + " |"
        )


if __name__ == "__main__":
    main()
