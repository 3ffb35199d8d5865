"""What a training run reports: the console (progress bars, log lines), log.csv, TensorBoard, a log
file and a picture of the curves; on the main process only."""

import csv
import logging
import math
import os
import sys

from tqdm import tqdm

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
        self.scalars(row["epoch"], {f"epoch/{k}": v for k, v in row.items() if k != "epoch"})

    def rows(self) -> list[dict]:
        if not os.path.exists(self.csv_path):
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def plot(self, groups: dict[str, list[str]]) -> str | None:
        """curves.png: one panel per group of columns (e.g. {'loss': [...], 'accuracy (%)': [...]})."""
        rows = self.rows()
        if not self.enabled or not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
        epochs = [float(r["epoch"]) for r in rows]
        for ax, (title, columns) in zip(axes[0], groups.items()):
            for column in columns:
                values = [float(r[column]) if r.get(column) not in (None, "") else math.nan for r in rows]
                ax.plot(epochs, values, marker="o", label=column)
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
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
    """tqdm on the main process; on a terminal it redraws, in a log file it writes a line every 30 s."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        disable=not processes.is_main,
        unit="batch",
        dynamic_ncols=interactive,
        mininterval=0.2 if interactive else 30,
        **kwargs,
    )


def setup_console_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO)
