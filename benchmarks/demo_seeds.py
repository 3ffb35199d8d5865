"""The three demos (hafa train, seg-train, det-train: a HAFA model and its baseline on the embedded data)
over several seeds, and their mean ± s.d.: the figures the README gives.

    python benchmarks/demo_seeds.py [--tasks classification segmentation detection] [--seeds 0 1 2]
        [--output runs/demo-seeds] [-- extra options for every run, e.g. --model hafa_convnext_atto --baseline]

Each run is the ordinary command with --seed N --output OUTPUT/<task>/seed<N>; a seed whose runs
have all finished is reused (their result.json read); a seed folder with unfinished runs stops the
script (continue them with the command's --resume, or remove the folder). Writes OUTPUT/<task>.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

COMMANDS = {"classification": "train", "segmentation": "seg-train", "detection": "det-train"}


def results_of(run_dir: str) -> dict[str, tuple[str, float]]:
    """model -> (the score's name, its best validation value), from each finished run's result.json."""
    scores = {}
    for model in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, model, "result.json")
        if os.path.isfile(path):
            with open(path) as f:
                result = json.load(f)
            scores[model] = (result["score"], result["best_score"])
    return scores


def table(task: str, seeds: list[int], per_seed: dict[int, dict]) -> str:
    models = sorted(
        {model for scores in per_seed.values() for model in scores}, key=lambda m: not m.startswith("hafa_")
    )
    metric = next(iter(per_seed[seeds[0]].values()))[0]
    lines = [
        f"{task} ({COMMANDS[task]}), seeds {', '.join(map(str, seeds))}: best val {metric}",
        "",
        f"| model | {metric} mean ± s.d. | each seed |",
        "|---|---:|---|",
    ]
    means = {}
    for model in models:
        values = [per_seed[seed][model][1] for seed in seeds]
        means[model] = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        each = ", ".join(f"{seed}: {value:.2f}" for seed, value in zip(seeds, values))
        lines.append(f"| {model} | {means[model]:.2f} ± {spread:.2f} | {each} |")
    if len(models) == 2:
        hafa, base = models
        gaps = [per_seed[seed][hafa][1] - per_seed[seed][base][1] for seed in seeds]
        spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        lines += ["", f"{hafa} - {base}: {statistics.mean(gaps):+.2f} points (s.d. {spread:.2f} over the seeds)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=tuple(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default=os.path.join("runs", "demo-seeds"))
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    hafa = os.path.join(os.path.dirname(sys.executable), "hafa")
    for task in args.tasks:
        per_seed = {}
        for seed in args.seeds:
            run_dir = os.path.join(args.output, task, f"seed{seed}")
            scores = results_of(run_dir) if os.path.isdir(run_dir) else {}
            if os.path.isdir(run_dir) and len(scores) < 2:
                sys.exit(f"{run_dir} holds unfinished runs: continue them with --resume, or remove the folder")
            if not scores:
                command = [hafa, COMMANDS[task], "--seed", str(seed), "--output", run_dir, *extra]
                print("$", " ".join(command), flush=True)
                subprocess.run(command, check=True)
                scores = results_of(run_dir)
            per_seed[seed] = scores
        text = table(task, args.seeds, per_seed)
        with open(os.path.join(args.output, f"{task}.md"), "w") as f:
            f.write(text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
