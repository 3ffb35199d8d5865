"""What `hafa bench` prints: the settings, markdown tables, HAFA / baseline ratios, the paper's figures
and this project's goals."""

import platform

import timm
import torch

from ...models.table import PAPER
from .timing import BenchConfig, Timing

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
    # compiled HAFA against the compiled baseline (inductor, static shapes)
    "cpu compiled": {"latency": ("<=", 1.10), "forward": ("<=", 1.08), "train_step": ("<=", 1.10)},
}
SIA_SHARE_TARGET = 0.15
# The cost model's goals: the most HAFA / baseline may be for a training step at batch 64, 224 x 224,
# with the Triton kernels (the setting in which they are checked).
COST_TARGETS = {"launches": 1.20, "bytes": 1.10}
COST_TARGET_SETTING = {"pass": "train", "batch": 64, "img_size": 224, "kernels": "triton"}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def paper_figures(name: str) -> dict:
    """The paper's parameters, GFLOPs, top-1 and GPU latency of a model (None where it gives none)."""
    params_m, gflops, top1 = PAPER.get(name, (None, None, None))
    return dict(params_m=params_m, gflops=gflops, top1=top1, gpu_latency_ms=PAPER_LATENCY_MS.get(name))


def pair_ratios(hafa: dict, baseline: dict) -> dict:
    """HAFA / baseline for each figure (time ratios for the timings), ours and the paper's."""
    ratios = dict(
        model=hafa["model"],
        baseline=baseline["model"],
        params=ratio(hafa["params_m"], baseline["params_m"]),
        gmacs=ratio(hafa["gmacs"], baseline["gmacs"]),
        operators=ratio(hafa["operators"], baseline["operators"]),
    )
    for kind in ("latency", "forward", "train_step"):
        if kind in hafa:
            ratios[kind] = ratio(hafa[kind]["median_ms"], baseline[kind]["median_ms"])
    ratios["throughput"] = ratio(hafa["throughput_img_s"], baseline["throughput_img_s"])
    for kind in hafa.get("memory_mb", {}):
        ratios[f"memory_{kind}"] = ratio(hafa["memory_mb"][kind], baseline["memory_mb"][kind])
    ratios["paper"] = {
        key: ratio(hafa["paper"][key], baseline["paper"][key]) for key in ("params_m", "gflops", "gpu_latency_ms")
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


def target_key(config: BenchConfig) -> str | None:
    """Which of TARGETS a measurement is held against (None: no goal for it)."""
    if not config.compile:
        return config.device.type
    return f"{config.device.type} compiled" if config.compile != "cudagraphs" else None


def target_lines(ratios: list[dict], key: str | None) -> list[str]:
    """HAFA / baseline of the three target pairs against this project's goals (TARGETS[key])."""
    lines = []
    for r in ratios:
        if r["model"] not in TARGET_PAIRS or key not in TARGETS:
            continue
        checks = []
        for kind, (relation, limit) in TARGETS[key].items():
            if r.get(kind) is not None:
                met = r[kind] <= limit if relation == "<=" else r[kind] >= limit
                checks.append(f"{kind} {r[kind]:.3f} ({relation} {limit}: {'met' if met else 'missed'})")
        lines.append(f"- {r['model']}: " + ", ".join(checks))
    return lines


def compile_markdown(rows: list[dict], config: BenchConfig) -> str:
    """Each model's compile times (the first run of each kind) and what one new input size cost."""
    small, large = config.batch_sizes
    kinds = [("latency", f"b{small}"), ("forward", f"b{large}")] + ([("train_step", "train")] if config.train else [])
    side = rows[0]["compile"]["new_size"]["img_size"]
    head = ["model"] + [f"compile {label} (s)" for _, label in kinds] + [f"new size {side}: graphs", "its compile (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        compiled = row["compile"]
        cells = [row["model"]] + [f"{compiled[kind]['seconds']:.1f}" for kind, _ in kinds]
        new_size = compiled["new_size"]
        if new_size["graphs"] is None:
            cells += ["- (one size only)", "-"]
        else:
            cells += [str(new_size["graphs"]), f"{new_size['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def sia_share_lines(breakdowns: list[dict], detection_size: tuple[int, int], batch: int) -> list[str]:
    """SIA's share of each backbone's forward at the detection size, against this project's goal."""
    height, width = detection_size
    return [
        f"\nSIA + dictionary share of the backbone's forward at {height}x{width}, batch {batch} "
        f"(goal < {SIA_SHARE_TARGET:.0%}; shares from torch.profiler, whose Python tracing adds "
        "a little to every Python call):",
        *(f"- {b['model']}: {b['sia_with_dictionary']:.1%}" for b in breakdowns),
    ]


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f}"


def cost_markdown(rows: list[dict]) -> str:
    """One table per pass: each pair's launches, MB read + written and GFLOP, in total and by part; the
    ratio row's part cells are each part's share of HAFA's excess, (HAFA's - baseline's) / baseline's total."""
    tables = []
    for pass_name, batch in dict.fromkeys((r["pass"], r["batch"]) for r in rows):
        pass_rows = [r for r in rows if (r["pass"], r["batch"]) == (pass_name, batch)]
        first = pass_rows[0]
        parts = list(first["counts"]["hafa"]["parts"])
        what = (
            "forward (eval, inference mode)"
            if pass_name == "forward"
            else "training step (forward, cross-entropy, backward)"
        )
        lines = [
            f"{what}, batch {batch}, {first['img_size']} x {first['img_size']}, kernels {first['kernels']}; "
            "by part: launches / MB",
            "",
            "| model | launches | MB | GFLOP | " + " | ".join(parts) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(parts),
        ]
        for r in pass_rows:
            for name, counts in ((r["baseline"], r["counts"]["baseline"]), (r["model"], r["counts"]["hafa"])):
                total = counts["total"]
                cells = [f"{p['launches']} / {_mb(p['bytes'])}" for p in counts["parts"].values()]
                lines.append(
                    f"| {name} | {total['launches']} | {_mb(total['bytes'])} | {total['flops'] / 1e9:.2f} | "
                    + " | ".join(cells)
                    + " |"
                )
            excess = part_excess(r)
            cells = [f"{excess['launches'][p]:+.3f} / {excess['bytes'][p]:+.3f}" for p in parts]
            lines.append(
                f"| **HAFA / baseline** | **{r['launches_ratio']:.3f}** | **{r['bytes_ratio']:.3f}** | "
                f"**{r['flops_ratio']:.3f}** | " + " | ".join(cells) + " |"
            )
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def part_excess(row: dict) -> dict[str, dict[str, float]]:
    """For launches and bytes: each part's (HAFA's - baseline's) / baseline's total, which sum to the
    HAFA / baseline ratio less 1."""
    hafa, baseline = row["counts"]["hafa"], row["counts"]["baseline"]
    return {
        measure: {
            part: (hafa["parts"][part][measure] - baseline["parts"][part][measure]) / baseline["total"][measure]
            for part in hafa["parts"]
        }
        for measure in COST_TARGETS
    }


def cost_target_lines(rows: list[dict]) -> list[str]:
    """The training-step rows of the three target pairs against COST_TARGETS: met or missed, and for a
    missed goal the parts that add to the excess, largest first."""
    lines = []
    for r in rows:
        if r["pass"] != "train" or r["model"] not in TARGET_PAIRS:
            continue
        excess = part_excess(r)
        checks = []
        for measure, limit in COST_TARGETS.items():
            value = r[f"{measure}_ratio"]
            check = f"{measure} {value:.3f} (<= {limit}: {'met' if value <= limit else 'missed'}"
            if value > limit:
                above = sorted(((e, p) for p, e in excess[measure].items() if e > 0), reverse=True)
                check += "; " + ", ".join(f"{p} {e:+.3f}" for e, p in above)
            checks.append(check + ")")
        lines.append(f"- {r['model']}: " + ", ".join(checks))
    return lines


def cost_goal_note(rows: list[dict]) -> str:
    """Which setting the cost goals are for, and whether these rows are counted in it."""
    setting = COST_TARGET_SETTING
    train = next(r for r in rows if r["pass"] == "train")
    here = {key: train[key] for key in setting}
    goal = (
        f"training step at batch {setting['batch']}, {setting['img_size']} x {setting['img_size']}, "
        f"--kernels {setting['kernels']}"
    )
    if here == setting:
        return f"HAFA / baseline against this project's cost goals ({goal}):"
    return (
        f"HAFA / baseline against this project's cost goals, which are set for a {goal} (counted here: "
        f"batch {here['batch']}, {here['img_size']} x {here['img_size']}, --kernels {here['kernels']}):"
    )
