"""`hafa models`: every HAFA model beside its baseline: parameters (ours, the official code's where it
exists, the paper's), GMACs, and the paper's top-1."""

import json

import timm
import torch

from ..errors import unknown_name
from ..models.table import BASELINE, OFFICIAL, PAPER
from .flops import count_macs

DEFAULT_MODELS = sorted(BASELINE)


def add_arguments(parser):
    parser.add_argument(
        "--models", nargs="+", default=DEFAULT_MODELS, help="HAFA models (each shown with its baseline)"
    )
    parser.add_argument("--img-size", type=int, default=224, help="input size for the MACs (default 224)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def model_row(name: str, img_size: int) -> dict:
    with torch.device("meta"):
        params = sum(p.numel() for p in timm.create_model(name).parameters())
    macs = count_macs(timm.create_model(name), (1, 3, img_size, img_size))
    paper = PAPER.get(name, (None, None, None))
    return dict(
        model=name,
        params_m=round(params / 1e6, 2),
        official_params_m=OFFICIAL.get(name),
        paper_params_m=paper[0],
        gmacs=round(macs / 1e9, 2),
        paper_gflops=paper[1],
        paper_top1=paper[2],
    )


def markdown(rows, img_size: int) -> str:
    def cell(v):
        return "-" if v is None else str(v)

    lines = [
        f"| model | params (M) | official code (M) | paper (M) | GMACs @{img_size} | paper GFLOPs | paper top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['params_m']} | {cell(r['official_params_m'])} | {cell(r['paper_params_m'])} | "
        f"{r['gmacs']} | {cell(r['paper_gflops'])} | {cell(r['paper_top1'])} |"
        for r in rows
    ]
    return "\n".join(lines)


def run(args) -> int:
    for name in args.models:
        if name not in BASELINE:
            raise unknown_name("HAFA model", name, DEFAULT_MODELS)
    print(
        f"MACs counted by torch.utils.flop_counter at {args.img_size}x{args.img_size} (clustering, bilinear "
        "sampling, merging and CPU attention by formula); the paper's 'GFLOPs' are MACs too. The paper cuts "
        "parameter counts to one decimal; the official code exists for PVT v1 only."
    )
    rows = [model_row(n, args.img_size) for name in args.models for n in (BASELINE[name], name)]
    print(markdown(rows, args.img_size))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
