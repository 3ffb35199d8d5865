"""What a training run reports: the console (progress bars, log lines), log.csv, TensorBoard, a log
file and a picture of the curves, on the main process only; and the summary of a command's runs."""

import csv
import logging
import math
import os
import sys

from ..models.table import BASELINE
from ..progress import progress
from .processes import ProcessContext


class RunLog:
    """Per-epoch rows to CSV and TensorBoard, a log file, and a PNG of the curves; main process only."""

    def __init__(self, run_dir: str, processes: ProcessContext, resume: bool):
        self.enabled = processes.is_main
        self.run_dir = run_dir
        self.csv_path = os.path.join(run_dir, "log.csv")
        self.writer = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(run_dir, "train.log"), mode="a" if resume else "w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        self._handler = handler
        if not resume and os.path.exists(self.csv_path):
            os.remove(self.csv_path)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def epoch(self, row: dict[str, float]) -> None:
        """Append one row (the same keys every epoch) to log.csv, dropping rows of epochs redone after a resume."""
        if not self.enabled:
            return
        rows = self.rows()
        rows = [r for r in rows if int(float(r["epoch"])) < row["epoch"]] + [{k: row[k] for k in row}]
        with open(self.csv_path + ".partial", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(self.csv_path + ".partial", self.csv_path)
        self.scalars(row["epoch"], {f"epoch/{k}": v for k, v in row.items() if k != "epoch" and v is not None})

    def rows(self) -> list[dict]:
        if not os.path.exists(self.csv_path):
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def plot(self, groups: dict[str, list[str]], note: str = "") -> str | None:
        """curves.png: one panel per group of columns (e.g. {'loss': [...], 'accuracy (%)': [...]}), whole
        epochs on the x axis, and `note` (what the curves measure) as a caption."""
        rows = self.rows()
        if not self.enabled or not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.9 if note else 3.6), squeeze=False)
        epochs = [float(r["epoch"]) for r in rows]
        for ax, (title, columns) in zip(axes[0], groups.items()):
            for column in columns:
                values = [float(r[column]) if r.get(column) not in (None, "") else math.nan for r in rows]
                ax.plot(epochs, values, marker="o", label=column)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        if note:
            fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, wrap=True)
            fig.tight_layout(rect=(0, 0.08, 1, 1))
        else:
            fig.tight_layout()
        path = os.path.join(self.run_dir, "curves.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()


def progress_bar(iterable, processes: ProcessContext, **kwargs):
    """A progress bar on the main process (hafa.progress: redrawn on a terminal, plain lines in a log)."""
    return progress(iterable, enabled=processes.is_main, unit=kwargs.pop("unit", "batch"), **kwargs)


def format_metric(name: str, value: float) -> str:
    """One unit and one precision for each metric, wherever it is shown: losses with 4 decimals, COCO's
    AP (%) with 1, every other score (%) with 2; "n/a" for an AP over an object size the data has none
    of (COCO's -1, stored as NaN)."""
    if math.isnan(value):
        return "n/a"
    if "loss" in name:
        return f"{value:.4f}"
    return f"{value:.1f}%" if "AP" in name else f"{value:.2f}%"


def format_metrics(metrics: dict) -> str:
    """The numbers of a metrics dict (counts and per-class tables left out), e.g. 'loss 0.0712  top1 98.50%'."""
    return "  ".join(f"{k} {format_metric(k, v)}" for k, v in metrics.items() if isinstance(v, float))


def baseline_pairs(results: list[dict]) -> list[tuple[dict, dict]]:
    """(HAFA result, its baseline's result) for the pairs that both trained at least one epoch."""
    trained = {r["model"]: r for r in results if r["best_epoch"] > 0}
    return [(r, trained[BASELINE[r["model"]]]) for r in trained.values() if BASELINE.get(r["model"]) in trained]


def print_best_scores(results: list[dict], score: str) -> None:
    """The best validation score of each model (and its score before training, for runs that started
    from weights), and each HAFA model against its baseline."""
    started = any(r.get("start_metrics") for r in results)
    start_header, start_rule = (f" before training {score} (%) |", "---:|") if started else ("", "")
    print(f"\n| model |{start_header} best val {score} (%) | at epoch | best checkpoint | curves |")
    print(f"|---|{start_rule}---:|---:|---|---|")
    for r in results:
        checkpoint = r["best_checkpoint"] or f"(not kept; last epoch: {r['last_checkpoint']})"
        start = ""
        if started:
            value = (r.get("start_metrics") or {}).get(r["score"])
            start = f" {'-' if value is None else f'{value:.2f}'} |"
        print(f"| {r['model']} |{start} {r['best_score']:.2f} | {r['best_epoch']} | {checkpoint} | {r['curves']} |")
    for hafa, base in baseline_pairs(results):
        print(f"{hafa['model']} vs {base['model']}: {hafa['best_score'] - base['best_score']:+.2f} points {score}")


def setup_console_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO)
