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
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..checkpoint import pack_names, read_file, unpack_names, write_file
from ..errors import UserError, message_of
from .options import check_device

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


def init_processes(device: str | None = None) -> Processes:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU). device: cpu, cuda or
    cuda:N (one process; under torchrun each process takes cuda:LOCAL_RANK), default cuda when available."""
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        index = int(device.partition(":")[2]) if device and ":" in device else local_rank
        torch.cuda.set_device(index)
        target = torch.device("cuda", index)
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


def all_sum(values: list[float], processes: Processes) -> list[float]:
    """Sum numbers over the processes (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=processes.device)
    if processes.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """RNG states of this process, as plain data."""
    np_state = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(),
        python=random.getstate(),
        numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    )
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


def gather_objects(value: Any, processes: Processes) -> list:
    """Every process's `value` (any picklable object), in rank order, on every process."""
    if not processes.distributed:
        return [value]
    values = [None] * processes.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: Any, processes: Processes) -> Any:
    """The main process's `value` (any picklable object) on every process."""
    if not processes.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_rng_states(processes: Processes) -> list[dict]:
    """Every process's RNG state, in rank order (for the checkpoint rank 0 writes)."""
    return gather_objects(rng_state(), processes)


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
        _logger.warning(
            "%s received: stopping after this step and saving; press Ctrl-C again to abort without saving",
            signal.Signals(signum).name,
        )

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
            raise UserError(
                f"{num_samples} training samples cannot fill one global batch of {self.global_batch}; "
                "lower --batch-size"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        order = order[: self.batches_per_epoch() * self.global_batch].view(
            -1, self.processes.world_size, self.batch_size
        )
        return iter(order[self.start_batch :, self.processes.rank].flatten().tolist())

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


def override_recipe(recipe: dict, options: dict[str, Any], settings: list[str]) -> dict:
    """The recipe with command-line values (None: not given) and `--set KEY=VALUE` items (YAML values)."""
    recipe = {**recipe, **{k: v for k, v in options.items() if v is not None}}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in recipe:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(recipe))}")
        recipe[key] = _recipe_value(f"{key}={value}", value, recipe[key])
    return recipe


def _recipe_value(item: str, text: str, current: Any) -> Any:
    """A YAML value of the setting's type; numbers YAML 1.1 reads as strings (1e-3) become floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if current is None or value is None:
        return value
    if isinstance(current, bool) or isinstance(value, bool):
        if isinstance(current, bool) and isinstance(value, bool):
            return value
    elif isinstance(current, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                value = text
        if isinstance(value, int) or (isinstance(value, float) and isinstance(current, float)):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(current, list):
        if isinstance(value, list):
            return value
    elif isinstance(value, str):
        return value
    raise UserError(f"--set {item}: expected {_kind_of(current)}, like the recipe's {current!r}")


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, list):
        return "a list [a, b, ...]"
    return "a text"


def build_optimizer(model: nn.Module, recipe: dict, global_batch: int) -> torch.optim.Optimizer:
    """AdamW (by default) with lr scaled linearly from lr_base_batch to the global batch; no weight
    decay on biases, norms, position embeddings and class tokens (timm's filter + no_weight_decay)."""
    lr = recipe["lr"] * global_batch / recipe["lr_base_batch"]
    extra = dict(betas=tuple(recipe["opt_betas"]), eps=recipe["opt_eps"]) if "adam" in recipe["opt"] else {}
    return create_optimizer_v2(model, opt=recipe["opt"], lr=lr, weight_decay=recipe["weight_decay"], **extra)


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


def progress_bar(iterable, processes: Processes, **kwargs):
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


# ---------------------------------------------------------------- the training loop


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


def autocast_context(amp: str, device: torch.device):
    """'none', 'bf16' (CPU or GPU) or 'fp16' (GPU, with a GradScaler)."""
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class Training:
    """What a task hands to `train`: model, data, optimisation, and how to compute a loss and to evaluate.

    loss(model, batch) -> (loss, images in the batch, unreadable files skipped), run under autocast.
    evaluate(model) -> metrics on the validation data (the unwrapped model; every process calls it).
    The best checkpoint is the one with the highest metrics[score]; both checkpoints are `header`
    (format, task, model, classes, settings) plus the weights, metrics and, in last.pth, the training state.
    """

    name: str
    run_dir: str
    model: nn.Module
    train_set: Dataset
    collate_fn: Callable
    sampler: EpochSampler
    workers: int
    epochs: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, int, int]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    score: str
    resume: bool = False
    amp: str = "none"
    clip_grad: float | None = None
    header: dict = field(default_factory=dict)  # hafa.checkpoint.checkpoint_content without weights
    sample_names: list[str] = field(default_factory=list)  # the training files: a resume must see the same
    sync_batchnorm: bool = False  # BatchNorm statistics over all processes (SyncBatchNorm) under DDP
    frozen_norms: nn.Module | None = None  # a part whose BatchNorm statistics stay as loaded (norm_eval)
    curves: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch done (a run stopped mid-epoch)
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    # a run stopped mid-epoch: the sum of the epoch's losses so far (mean over processes) and its steps,
    # so that the resumed epoch's mean loss is the uninterrupted one
    epoch_loss_sum: float = 0.0
    epoch_steps: int = 0


@dataclass
class _Epoch:
    stopped: bool
    loss: float = math.nan
    images_per_s: float = 0.0
    skipped: int = 0


def train(t: Training, processes: Processes) -> dict:
    """Run (or resume) a training: epochs of steps, evaluation and checkpoints after each epoch.

    -> dict(status 'finished' or 'interrupted', best_score, best_epoch, epochs_done, run_dir,
    best_checkpoint, curves, network (the trained model)).
    """
    last_path, best_path = os.path.join(t.run_dir, "last.pth"), os.path.join(t.run_dir, "best.pth")
    scaler = torch.amp.GradScaler(processes.device.type, enabled=t.amp == "fp16")
    state = TrainState()
    if t.resume:
        saved = read_file(last_path)
        _check_same_samples(unpack_names(saved["samples"]), t.sample_names, t.run_dir)
        t.model.load_state_dict(saved["state_dict"])
        t.optimizer.load_state_dict(saved["optimizer"])
        t.scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["train_state"])
        if len(saved["rng"]) != processes.world_size:
            raise UserError(f"the run was saved by {len(saved['rng'])} processes; resume it with the same number")
        set_rng_state(saved["rng"][processes.rank])
        _logger.info("resuming %s at epoch %d, batch %d", t.name, state.epoch + 1, state.step_in_epoch)
    model = t.model
    if processes.distributed and t.sync_batchnorm and processes.device.type == "cuda":
        # the same parameters in new modules: the optimizer and the checkpoint's names are unchanged.
        # (torch synchronises BatchNorm on GPUs only; CPU processes keep their own statistics.)
        nn.SyncBatchNorm.convert_sync_batchnorm(t.model)
    if processes.distributed:
        model = DistributedDataParallel(
            model, device_ids=[processes.local_rank] if processes.device.type == "cuda" else None
        )

    samples = pack_names(t.sample_names)

    def checkpoint(metrics: dict) -> dict:  # every process takes part (RNG states are gathered)
        return dict(
            t.header,
            state_dict=t.model.state_dict(),
            metrics=metrics,
            optimizer=t.optimizer.state_dict(),
            scheduler=t.scheduler.state_dict(),
            scaler=scaler.state_dict(),
            train_state=vars(state).copy(),
            rng=gather_rng_states(processes),
            samples=samples,
        )

    log = RunLog(t.run_dir, processes, t.resume)
    status = "finished"
    try:
        with StopOnSignal(processes) as stopper:
            while state.epoch < t.epochs:
                epoch = _train_epoch(t, model, scaler, state, processes, stopper)
                if epoch.stopped:
                    saved = checkpoint({})
                    if processes.is_main:
                        write_file(last_path, saved)
                    status = "interrupted"
                    break
                metrics = t.evaluate(t.model)
                state.epoch += 1
                state.step_in_epoch = state.epoch_steps = 0
                state.epoch_loss_sum = 0.0
                t.scheduler.step(state.epoch)
                is_best = metrics[t.score] > state.best_score
                if is_best:
                    state.best_score, state.best_epoch = metrics[t.score], state.epoch
                saved = checkpoint(metrics)
                if processes.is_main:
                    write_file(last_path, saved)
                    if is_best:
                        write_file(
                            best_path,
                            dict(t.header, state_dict=saved["state_dict"], metrics=metrics, epoch=state.epoch),
                        )
                    row = dict(
                        epoch=state.epoch,
                        train_loss=round(epoch.loss, 5),
                        lr=t.optimizer.param_groups[0]["lr"],
                        images_per_s=round(epoch.images_per_s, 1),
                        skipped_images=epoch.skipped,
                        **{f"val_{k}": round(v, 5) for k, v in metrics.items() if isinstance(v, float)},
                    )
                    log.epoch(row)
                    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
                    _logger.info(
                        "%s epoch %d/%d: train loss %.4f  val %s  %.0f img/s%s",
                        t.name,
                        state.epoch,
                        t.epochs,
                        epoch.loss,
                        shown,
                        epoch.images_per_s,
                        f"  ({epoch.skipped} unreadable images skipped)" if epoch.skipped else "",
                    )
    except UserError as error:
        raise type(error)(f"{message_of(error)}; {_what_is_saved(last_path)}") from error
    finally:
        curves = log.plot(t.curves) if t.curves else None
        log.close()
    return dict(
        status=status,
        best_score=state.best_score,
        best_epoch=state.best_epoch,
        epochs_done=state.epoch,
        run_dir=t.run_dir,
        best_checkpoint=best_path,
        curves=curves,
        network=t.model,
    )


def freeze_batchnorm_statistics(module: nn.Module) -> None:
    """Put module's BatchNorms (SyncBatchNorm too) in eval mode: they normalise with their running
    statistics and keep them (mmdetection's norm_eval); their weights still train."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()


def _check_same_samples(saved: list[str], current: list[str], run_dir: str) -> None:
    """A resumed run must see the training data it started with (the sample order depends on it)."""
    if saved == current:
        return
    added, removed = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    changes = [f"{len(added)} added ({', '.join(added[:3])}{' ...' if len(added) > 3 else ''})"] if added else []
    changes += [f"{len(removed)} removed ({', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''})"] * bool(
        removed
    )
    raise UserError(
        f"--resume: the training data changed since the run in {run_dir} started: "
        f"{'; '.join(changes) or 'the same files in another order'}. Resume with the data it started with, "
        "or start a new run"
    )


def _what_is_saved(last_path: str) -> str:
    if os.path.isfile(last_path):
        return f"the last finished epoch is saved in {last_path}; continue it with --resume"
    return "no epoch had finished, so nothing was saved"


def _train_epoch(
    t: Training, model: nn.Module, scaler, state: TrainState, processes: Processes, stopper: StopOnSignal
) -> _Epoch:
    """One epoch (or its rest after a resume), or less when a stop is requested."""
    model.train()
    if t.frozen_norms is not None:
        freeze_batchnorm_statistics(t.frozen_norms)
    t.train_set.set_epoch(state.epoch)
    t.sampler.set_epoch(state.epoch, state.step_in_epoch)
    # The loader's own generator: creating it must not draw from the global RNG, or a resumed run would
    # drift from an uninterrupted one (augmentation is seeded per sample).
    loader = DataLoader(
        t.train_set,
        batch_size=t.sampler.batch_size,
        sampler=t.sampler,
        num_workers=t.workers,
        collate_fn=t.collate_fn,
        pin_memory=processes.device.type == "cuda",
        drop_last=True,
        generator=torch.Generator().manual_seed(state.epoch),
    )
    progress = progress_bar(
        loader,
        processes,
        total=t.sampler.batches_per_epoch(),
        initial=state.step_in_epoch,
        desc=f"{t.name} {state.epoch + 1}/{t.epochs}",
    )
    loss_sum, steps = state.epoch_loss_sum, state.epoch_steps
    images_seen, skipped, speed, start = 0, 0, 0.0, time.perf_counter()
    for batch in progress:
        with autocast_context(t.amp, processes.device):
            loss, images, skipped_now = t.loss(model, batch)
        stop, nonfinite = stopper.requested(not torch.isfinite(loss).item())
        if nonfinite:
            raise NonFiniteLoss(
                f"the loss became {loss.item()} at epoch {state.epoch + 1}, batch {state.step_in_epoch + 1} (try a "
                "lower --lr, --amp none or --clip-grad)"
            )
        t.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.clip_grad:
            scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        scaler.step(t.optimizer)
        scaler.update()
        state.global_step += 1
        state.step_in_epoch += 1
        t.scheduler.step_update(num_updates=state.global_step)
        loss_sum += loss.item()
        steps += 1
        images_seen += images * processes.world_size
        skipped += skipped_now
        speed = images_seen / (time.perf_counter() - start)
        progress.set_postfix(
            loss=f"{loss_sum / steps:.4f}",
            lr=f"{t.optimizer.param_groups[0]['lr']:.2e}",
            img_s=f"{speed:.0f}",
            refresh=False,
        )  # drawn at tqdm's own interval
        if stop:
            progress.close()
            state.epoch_loss_sum = all_sum([loss_sum], processes)[0] / processes.world_size
            state.epoch_steps = steps
            return _Epoch(stopped=True)
    progress.close()
    loss_mean, skipped_all = all_sum([loss_sum / max(steps, 1), float(skipped)], processes)
    return _Epoch(False, loss_mean / processes.world_size, speed, int(skipped_all))
