"""`hafa models`: every HAFA model beside its baseline: parameters (ours, the official code's where it
exists, the paper's), GMACs, and the paper's top-1; `--families`: the families hafa.convert takes."""

import sys

import torch

from ..errors import unknown_name
from ..models import FAMILIES
from ..models.table import BASELINE, OFFICIAL, PAPER, PARAMS
from ..progress import progress
from ..spec import add_json_option, add_setting, write_json
from ..tasks.networks import sized_model
from ..tasks.run_settings import image_side
from .flops import count_macs

# The paper's families (PVT v1, PVT v2, Swin); every other hafa_<name> with --models.
DEFAULT_MODELS = sorted(name for name in PARAMS if name in BASELINE)


def add_arguments(parser):
    parser.add_argument(
        "--models",
        nargs="+",
        default=DEFAULT_MODELS,
        help="HAFA models, each shown with its baseline (default: the paper's PVT v1, PVT v2 and Swin models; any "
        "hafa_<timm name> of the families hafa.convert takes)",
    )
    parser.add_argument(
        "--families",
        action="store_true",
        help="list the families instead: the models each registers, its default transitions, the stages SIA can start",
    )
    add_setting(parser, "--img-size", setting=image_side(224), help="input size for the MACs")
    add_json_option(parser, "the rows")


def model_row(name: str, img_size: int) -> dict:
    with torch.device("meta"):
        params = sum(p.numel() for p in sized_model(name, img_size).parameters())
    macs = count_macs(sized_model(name, img_size), (1, 3, img_size, img_size))
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
        f"| {r['model']} | {r['params_m']:.2f} | {cell(r['official_params_m'])} | {cell(r['paper_params_m'])} | "
        f"{r['gmacs']:.2f} | {cell(r['paper_gflops'])} | {cell(r['paper_top1'])} |"
        for r in rows
    ]
    return "\n".join(lines)


def family_row(family) -> dict:
    """A family's registered models, and its default transitions and SIA's stages on its first model."""
    with torch.device("meta"):
        model = family.create(family.model_names[0])
    attending = sorted(family.attention_stages(model))
    return dict(
        family=family.name,
        models=len(family.model_names),
        first=f"hafa_{family.model_names[0]}",
        default=list(family.default_stage_aggregation(model)),
        sia_stages=[stage + 1 for stage in attending if stage > 0],
    )


def families_markdown(rows: list[dict]) -> str:
    lines = [
        "| family | registered models | e.g. | default transitions | stages SIA can start (of the first model) |",
        "|---|---:|---|---|---|",
    ]
    for r in rows:
        sia = ", ".join(map(str, r["sia_stages"])) or "none"
        lines.append(f"| {r['family']} | {r['models']} | {r['first']} | {', '.join(r['default']).upper()} | {sia} |")
    total = sum(r["models"] for r in rows)
    return "\n".join([*lines, f"\n{len(rows)} families, {total} registered models (hafa_<timm name>)"])


def run(args) -> int:
    if args.families:
        rows = [family_row(f) for f in progress(FAMILIES, desc="families", unit="family")]
        print(families_markdown(rows))
        if args.json:
            write_json(args.json, rows)
        return 0
    for name in args.models:
        if name not in BASELINE:
            raise unknown_name("HAFA model", name, sorted(BASELINE))
    print(
        f"MACs counted by torch.utils.flop_counter at {args.img_size}x{args.img_size} (clustering, bilinear "
        "sampling, merging and CPU attention by formula); the paper's 'GFLOPs' are MACs too. The paper cuts "
        "parameter counts to one decimal; the official code exists for PVT v1 only."
    )
    names = [n for name in args.models for n in (BASELINE[name], name)]
    if len(names) > 4:
        print(
            f"building and counting {len(names)} models (a few seconds each; --models NAME ... for fewer)",
            file=sys.stderr,
        )
    rows = [model_row(n, args.img_size) for n in progress(names, desc="models", unit="model")]
    print(markdown(rows, args.img_size))
    if args.json:
        write_json(args.json, rows)
    return 0
