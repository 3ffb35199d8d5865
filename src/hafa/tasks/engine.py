"""What every training task shares: processes (torchrun / DDP), atomic checkpoints that load with
weights_only, exact resume (RNG states of every process), stopping cleanly on a signal, run logs
(console, CSV, TensorBoard, a picture of the curves), the recipe files and the sample order."""
import csv
import logging
import math
import os
import random
import signal
import sys
from dataclasses import dataclass
from importlib.resources import files
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import Sampler
from tqdm import tqdm

from ..errors import UserError

_logger = logging.getLogger("hafa")


# ---------------------------------------------------------------- processes

@dataclass
class Processes:
    """This process's place among the training processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_processes(device: Optional[str] = None) -> Processes:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but CUDA is not available here")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Processes(rank, world_size, local_rank, target)


def close_processes() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


def all_sum(values: List[float], processes: Processes) -> List[float]:
    """Sum numbers over the processes (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=processes.device)
    if processes.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file, then rename into place: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint as data (weights_only=True): never unpickles code. UserError when unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path} (corrupt, or not a plain-data checkpoint): {error}") from error


def rng_state() -> dict:
    """RNG states of this process, as plain data."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def gather_rng_states(processes: Processes) -> List[dict]:
    """Every process's RNG state, in rank order (for the checkpoint rank 0 writes)."""
    state = rng_state()
    if not processes.distributed:
        return [state]
    states = [None] * processes.world_size
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------- stopping

class StopOnSignal:
    """SIGINT / SIGTERM ask the loop to stop after the current step (a second SIGINT stops at once).

    In several processes `requested()` agrees across all of them, so they stop at the same step.
    """

    def __init__(self, processes: Processes):
        self.processes = processes
        self.flag = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        _logger.warning("%s received: stopping after this step and saving a checkpoint", signal.Signals(signum).name)

    def requested(self, other_flag: bool = False) -> tuple:
        """(stop requested anywhere, other_flag set anywhere) -- one collective per step."""
        stop, other = all_sum([float(self.flag), float(other_flag)], self.processes)
        return stop > 0, other > 0


# ---------------------------------------------------------------- sample order

class EpochSampler(Sampler):
    """This process's share of a seeded permutation per epoch (the same global order for any number
    of processes: global batch b is samples [b*G, (b+1)*G) of the permutation), starting at a batch
    when a run resumes mid-epoch. Every process gets the same number of samples (the tail is
    dropped when it does not fill a global batch)."""

    def __init__(self, num_samples: int, batch_size: int, processes: Processes, seed: int, shuffle: bool = True):
        self.num_samples, self.batch_size, self.processes = num_samples, batch_size, processes
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.global_batch = batch_size * processes.world_size
        if num_samples < self.global_batch:
            raise UserError(f"{num_samples} training samples cannot fill one global batch of {self.global_batch}; "
                            "lower --batch-size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        order = order[:self.batches_per_epoch() * self.global_batch].view(-1, self.processes.world_size, self.batch_size)
        return iter(order[self.start_batch:, self.processes.rank].flatten().tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


class ShardSampler(Sampler):
    """Evaluation: process r takes samples r, r + world, ... (no padding, so no sample counts twice)."""

    def __init__(self, num_samples: int, processes: Processes):
        self.indices = list(range(processes.rank, num_samples, processes.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ---------------------------------------------------------------- recipes

def recipe_path(name_or_path: str) -> str:
    """A recipe file: a path, or the name of one shipped in hafa/configs (e.g. 'imagenet_hafa')."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = files("hafa") / "configs" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return str(shipped)
    known = sorted(p.name[:-5] for p in (files("hafa") / "configs").iterdir() if p.name.endswith(".yaml"))
    raise UserError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(known)})")


def load_recipe(name_or_path: str, defaults: dict) -> dict:
    """Recipe values over the defaults; an unknown key is an error (a typo would silently do nothing)."""
    path = recipe_path(name_or_path)
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise UserError(f"recipe {path} is not valid YAML: {error}") from error
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise UserError(f"recipe {path} has unknown settings: {', '.join(unknown)}")
    return {**defaults, **values}


# ---------------------------------------------------------------- logs

class RunLog:
    """Per-epoch rows to CSV and TensorBoard, a log file, and a PNG of the curves; main process only."""

    def __init__(self, run_dir: str, processes: Processes, resume: bool):
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

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def epoch(self, row: Dict[str, float]) -> None:
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

    def rows(self) -> List[dict]:
        if not os.path.exists(self.csv_path):
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def plot(self, groups: Dict[str, List[str]]) -> Optional[str]:
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


def progress_bar(iterable, processes: Processes, **kwargs):
    """tqdm on the main process; on a terminal it redraws, in a log file it writes a line every 30 s."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, disable=not processes.is_main, unit="batch", dynamic_ncols=interactive,
                mininterval=0.2 if interactive else 30, **kwargs)


def setup_console_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO)
