"""Upcycling, measured on the embedded data: how much of a pretrained baseline a HAFA model keeps at
step 0, and what fine-tuning it gives against fine-tuning the baseline itself.

    python benchmarks/upcycling.py [--models pvt_v2_b0 pvt_tiny] [--seeds 0 1 2]
        [--tasks classification segmentation] [--pretrain-epochs 5] [--finetune-epochs 2] [--finetune-lr 3e-4]
        [--output runs/upcycling] [-- extra options for every fine-tuning run]

For each baseline: `hafa train` pretrains it on the embedded digits (seed 100, --pretrain-epochs);
then, for each seed, the same fine-tuning recipe starts from those weights (`--init-from`):
the baseline itself, and its HAFA model with each `--laa-norm` (baseline: LAA keeps the
transition's norm; batch: the paper's BatchNorm + GELU). Classification fine-tunes on the same
digits (--finetune-epochs at --finetune-lr, no warm-up); segmentation puts the pretrained backbone into Semantic FPN
(`hafa seg-train --backbone-checkpoint`, the demo's iterations). Step 0 is the evaluation a run
makes before its first step (epoch 0 of its log; for segmentation the FPN head is new, so step 0
is left out). Every run is an ordinary command in OUTPUT/; a finished one is reused. Writes
OUTPUT/upcycling.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

PRETRAIN_SEED = 100
LAA_NORMS = ("baseline", "batch")
COMMANDS = {"classification": "train", "segmentation": "seg-train"}


def hafa_command() -> str:
    return os.path.join(os.path.dirname(sys.executable), "hafa")


def run(command: list[str], run_dir: str) -> dict:
    """The command's result.json, running it unless a finished run is there (an unfinished one is resumed)."""
    result_path = os.path.join(run_dir, "result.json")
    if not os.path.isfile(result_path):
        if os.path.isfile(os.path.join(run_dir, "last.pth")):
            command = [*command, "--resume"]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    with open(result_path) as f:
        result = json.load(f)
    if result["status"] != "finished":
        sys.exit(f"{run_dir} did not finish ({result['status']}): continue it with --resume, or remove it")
    return result


def arms(baseline: str) -> dict[str, list[str]]:
    """arm name -> the model and options it trains."""
    hafa = f"hafa_{baseline}"
    return {
        f"{baseline} (fine-tuned)": ["--model", baseline],
        **{f"{hafa}, --laa-norm {norm}": ["--model", hafa, "--laa-norm", norm] for norm in LAA_NORMS},
    }


def pretrain(baseline: str, epochs: int, output: str) -> str:
    """The baseline trained on the embedded digits; -> its best.pth."""
    folder = os.path.join(output, "pretrain")
    command = [hafa_command(), "train", "--model", baseline, "--epochs", str(epochs), "--seed", str(PRETRAIN_SEED)]
    result = run([*command, "--output", folder], os.path.join(folder, baseline))
    return result["best_checkpoint"]


def finetune(task: str, baseline: str, weights: str, seed: int, args, extra: list[str]) -> dict[str, dict]:
    """arm -> its result.json, for one seed."""
    results = {}
    for arm, model_options in arms(baseline).items():
        folder = os.path.join(args.output, task, _slug(arm), f"seed{seed}")
        start = ["--init-from", weights] if task == "classification" else ["--backbone-checkpoint", weights]
        length = []
        if task == "classification":  # a fine-tune: a lower rate, no warm-up
            length = ["--epochs", str(args.finetune_epochs), "--lr", str(args.finetune_lr), "--warmup-epochs", "0"]
        command = [hafa_command(), COMMANDS[task], *model_options, *start, *length, "--seed", str(seed)]
        results[arm] = run([*command, "--output", folder, *extra], os.path.join(folder, model_options[1]))
    return results


def _slug(arm: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "-" for c in arm).strip("-")


def mean_sd(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def table(task: str, baseline: str, source: dict, per_seed: dict[int, dict], seeds: list[int]) -> list[str]:
    metric = source["score"] if task == "classification" else next(iter(per_seed[seeds[0]].values()))["score"]
    lines = [f"### {task}: {baseline}", ""]
    if task == "classification":
        lines += [f"pretrained {baseline}: best val {metric} {source['best_score']:.2f}", ""]
    lines += [f"| start | step 0 {metric} | fine-tuned best {metric} | each seed |", "|---|---:|---:|---|"]
    for arm in arms(baseline):
        finals = [per_seed[seed][arm]["best_score"] for seed in seeds]
        starts = [per_seed[seed][arm].get("start_metrics", {}).get(metric) for seed in seeds]
        start = mean_sd(starts) if None not in starts else "-"
        each = ", ".join(f"{seed}: {value:.2f}" for seed, value in zip(seeds, finals))
        lines.append(f"| {arm} | {start} | {mean_sd(finals)} | {each} |")
    return [*lines, ""]


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pvt_v2_b0", "pvt_tiny"], help="baselines to upcycle")
    parser.add_argument("--tasks", nargs="+", choices=tuple(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-lr", type=float, default=3e-4, help="classification fine-tuning's lr")
    parser.add_argument("--output", default=os.path.join("runs", "upcycling"))
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    report = [
        "Upcycling on the embedded data (small scale: 4,000 training digits, 64 px; the scenes for "
        "segmentation). Fine-tuning runs share one recipe; mean ± s.d. over seeds "
        f"{', '.join(map(str, args.seeds))}.",
        "",
    ]
    for baseline in args.models:
        weights = pretrain(baseline, args.pretrain_epochs, args.output)
        with open(os.path.join(os.path.dirname(weights), "result.json")) as f:
            source = json.load(f)
        for task in args.tasks:
            per_seed = {seed: finetune(task, baseline, weights, seed, args, extra) for seed in args.seeds}
            report += table(task, baseline, source, per_seed, args.seeds)
    path = os.path.join(args.output, "upcycling.md")
    with open(path, "w") as f:
        f.write("\n".join(report))
    print("\n".join(report))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
