"""Kernel-launching operators in one forward, HAFA beside its baseline, on the fixed-shape path that a GPU
takes (every token scanned for DPC-KNN's relative distance), counted on CPU: at small batches a GPU's
eager latency follows this count more than the arithmetic. HAFA's own parts are listed apart.

    python benchmarks/count_operators.py [--models hafa_pvt_tiny ...] [--img-size 224] [--batch 1]
"""

import argparse
from functools import partial

import timm
import torch

import hafa  # noqa: F401  (registers the models)
from hafa.layers import LAA, SIA
from hafa.models.swin import LAAPatchMerging
from hafa.models.table import BASELINE
from hafa.ops import clustering
from hafa.tools.bench import TARGET_PAIRS, count_operators


def layer_calls(model: torch.nn.Module, x: torch.Tensor, kinds: tuple[type, ...]) -> list:
    """(layer, args, kwargs) of every call of a layer of these kinds in one forward."""
    calls = []

    def record(layer, args, kwargs):
        calls.append((layer, args, kwargs))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if isinstance(m, kinds)]
    model(x)
    for hook in hooks:
        hook.remove()
    return calls


def operators_by_part(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Operators of the whole forward and of its LAA and SIA layers (SIA's including its clustering)."""
    counts = {"forward": count_operators(partial(model, x))}
    for part, kinds in (("LAA", (LAA, LAAPatchMerging)), ("SIA", (SIA,))):
        calls = layer_calls(model, x, kinds)
        counts[part] = sum(count_operators(partial(layer, *args, **kwargs)) for layer, args, kwargs in calls)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TARGET_PAIRS), help="HAFA models (with their baselines)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    clustering._scans_every_token = lambda x: True  # the GPU's path, on CPU
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    print(f"batch {args.batch}, {args.img_size} x {args.img_size}, torch {torch.__version__}\n")
    print("| model | operators | baseline | HAFA / baseline | of which LAA | of which SIA |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name in args.models:
            counts = {}
            for model_name in (name, BASELINE[name]):
                model = timm.create_model(model_name).eval()
                model(x)  # builds what is kept between forwards
                counts[model_name] = operators_by_part(model, x)
            ours, baseline = counts[name], counts[BASELINE[name]]["forward"]
            print(
                f"| {name} | {ours['forward']} | {baseline} | {ours['forward'] / baseline:.2f} "
                f"| {ours['LAA']} | {ours['SIA']} |"
            )


if __name__ == "__main__":
    main()
