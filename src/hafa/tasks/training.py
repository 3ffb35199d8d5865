"""The training loop every task runs: epochs of steps under autocast, evaluation and checkpoints after
each epoch, exact resume (weights, optimizer, schedule, every process's RNG states, the sample order,
the interrupted epoch's loss), stopping cleanly on a signal, and the BatchNorm choices of dense tasks."""

import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import pack_names, read_file, unpack_names, write_file
from ..compiled import close_compile_window, compiling
from ..errors import UserError, message_of
from ..models import freeze_batch_norm_statistics
from ..progress import format_rate
from ..spec import write_json
from .processes import ProcessContext, all_sum, any_process, gather_objects
from .run_log import RunLog, format_metrics, progress_bar
from .sampling import EpochSampler

_logger = logging.getLogger("hafa")


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


def gather_rng_states(processes: ProcessContext) -> list[dict]:
    """Every process's RNG state, in rank order (for the checkpoint rank 0 writes)."""
    return gather_objects(rng_state(), processes)


# ---------------------------------------------------------------- stopping


class StopRequested(KeyboardInterrupt):
    """A signal arrived while a graph was compiling: the step (or evaluation) is abandoned at once."""


class StopOnSignal:
    """SIGINT / SIGTERM ask the loop to stop after the current step (a second SIGINT stops at once).

    The loop asks every process (`any_process`) whether one received it, so that all stop at the same step.
    While a graph compiles (minutes, for a new input size) a single process stops at once instead
    (StopRequested): the loop then saves the state from before the abandoned step or evaluation.
    """

    def __init__(self, at_once_while_compiling: bool = True):
        self.flag = False
        self.at_once_while_compiling = at_once_while_compiling
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
        if self.at_once_while_compiling and compiling():
            _logger.warning("%s received while compiling: stopping now", signal.Signals(signum).name)
            raise StopRequested
        _logger.warning(
            "%s received: stopping after this step and saving; press Ctrl-C again to abort without saving",
            signal.Signals(signum).name,
        )


# ---------------------------------------------------------------- the loop


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


class NothingLeftToDo(UserError):
    """A resumed run has done every epoch it is asked for."""


def autocast_context(amp: str, device: torch.device):
    """'none', 'bf16' (CPU or GPU) or 'fp16' (GPU, with a GradScaler)."""
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


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
    curves_note: str = ""  # what the curves measure, under the picture
    keep: str = "both"  # what a finished run keeps: "both", "best" (best.pth) or "last" (last.pth)
    length_option: str = "--epochs"  # the option that sets the run's length (seg-train: --iterations)
    compiled: str | None = None  # the network's torch.compile mode: the first step's time (compiling) is logged
    # the model starts from weights: a new run evaluates it before the first step (epoch 0 of the log)
    evaluate_at_start: bool = False
    source_metrics: dict | None = None  # the model those weights came from, on the same data (result.json)


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
    best_metrics: dict | None = None  # the validation metrics of the best epoch
    start_metrics: dict | None = None  # the validation metrics before the first step (evaluate_at_start)


@dataclass
class _Epoch:
    stopped: bool
    loss: float = math.nan
    images_per_s: float = 0.0
    skipped: int = 0
    steps: int = 0
    rng: dict | None = None  # a step abandoned while compiling: this process's RNG state from before it


def train(t: Training, processes: ProcessContext) -> dict:
    """Run (or resume) a training: epochs of steps, evaluation and checkpoints after each epoch.

    -> dict(status 'finished' or 'interrupted', best_score, best_epoch, best_metrics, epochs_done, run_dir,
    best_checkpoint and last_checkpoint (None when not kept), curves, network (the trained model)).
    A finished run writes result.json (the same, without the network) and keeps what t.keep says.
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
        _check_something_left(t, state)
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

    def checkpoint(metrics: dict, rng: dict | None = None) -> dict:
        """Every process takes part (RNG states are gathered), unless rng, one process's state, is given."""
        return dict(
            t.header,
            state_dict=t.model.state_dict(),
            metrics=metrics,
            optimizer=t.optimizer.state_dict(),
            scheduler=t.scheduler.state_dict(),
            scaler=scaler.state_dict(),
            train_state=vars(state).copy(),
            rng=[rng] if rng is not None else gather_rng_states(processes),
            samples=samples,
        )

    log = RunLog(t.run_dir, processes, t.resume)
    first_step = state.global_step
    status = "finished"
    try:
        with StopOnSignal(at_once_while_compiling=not processes.distributed) as stopper:
            if t.evaluate_at_start and not t.resume:
                _evaluate_start(t, state, log, processes)
            while state.epoch < t.epochs:
                epoch = _train_epoch(t, model, scaler, state, processes, stopper, first_step)
                if not epoch.stopped:
                    rng_before = rng_state() if t.compiled else None
                    try:
                        metrics = t.evaluate(t.model)
                        close_compile_window()
                    except StopRequested:  # the epoch is trained, its evaluation not done: saved as such
                        state.epoch_loss_sum, state.epoch_steps = epoch.loss * epoch.steps, epoch.steps
                        epoch = _Epoch(stopped=True, rng=rng_before)
                if epoch.stopped:
                    if epoch.rng is not None and state.global_step == 0:
                        raise UserError("stopped while compiling the first step, before any step had finished")
                    saved = checkpoint({}, epoch.rng)
                    if processes.is_main:
                        write_file(last_path, saved)
                    status = "interrupted"
                    break
                state.epoch += 1
                state.step_in_epoch = state.epoch_steps = 0
                state.epoch_loss_sum = 0.0
                t.scheduler.step(state.epoch)
                is_best = metrics[t.score] > state.best_score
                if is_best:
                    state.best_score, state.best_epoch = metrics[t.score], state.epoch
                    state.best_metrics = plain_numbers(metrics)
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
                        images_per_s=round(epoch.images_per_s, 3),
                        skipped_images=epoch.skipped,
                        **{f"val_{k}": round(v, 5) for k, v in metrics.items() if isinstance(v, float)},
                    )
                    log.epoch(row)
                    _logger.info(
                        "%s epoch %d/%d: train loss %.4f  val %s  %s img/s%s",
                        t.name,
                        state.epoch,
                        t.epochs,
                        epoch.loss,
                        format_metrics(metrics),
                        format_rate(epoch.images_per_s),
                        f"  ({epoch.skipped} unreadable images skipped)" if epoch.skipped else "",
                    )
    except UserError as error:
        raise type(error)(f"{message_of(error)}; {_what_is_saved(last_path)}") from error
    finally:
        curves = log.plot(t.curves, t.curves_note) if t.curves else None
        log.close()
    result = dict(
        status=status,
        model=t.name,
        score=t.score,
        best_score=state.best_score,
        best_epoch=state.best_epoch,
        best_metrics=state.best_metrics,
        start_metrics=state.start_metrics,
        source_metrics=t.source_metrics,
        epochs_done=state.epoch,
        epochs=t.epochs,
        run_dir=t.run_dir,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        curves=curves,
    )
    if status == "finished" and processes.is_main:
        result.update(_keep(t.keep, best_path, last_path))
        write_json(os.path.join(t.run_dir, RESULT_FILE), result)
    return dict(result, network=t.model)


RESULT_FILE = "result.json"


def plain_numbers(metrics: dict) -> dict:
    """The numbers of a metrics dict, None where undefined (NaN would not compare)."""
    return {
        k: None if isinstance(v, float) and math.isnan(v) else v
        for k, v in metrics.items()
        if isinstance(v, (int, float))
    }


def _evaluate_start(t: Training, state: TrainState, log: RunLog, processes: ProcessContext) -> None:
    """The starting weights evaluated before the first step: epoch 0 of the log (no training columns)."""
    try:
        metrics = t.evaluate(t.model)
        close_compile_window()
    except StopRequested:
        raise UserError("stopped while evaluating the starting weights, before any step") from None
    state.start_metrics = plain_numbers(metrics)
    if processes.is_main:
        row = dict(epoch=0, train_loss=None, lr=None, images_per_s=None, skipped_images=None)
        log.epoch(dict(row, **{f"val_{k}": round(v, 5) for k, v in metrics.items() if isinstance(v, float)}))
        source = f"; the model the weights came from: {format_metrics(t.source_metrics)}" if t.source_metrics else ""
        _logger.info("%s before training (epoch 0): val %s%s", t.name, format_metrics(metrics), source)


def _keep(keep: str, best_path: str, last_path: str) -> dict:
    """Remove what a finished run does not keep. -> the checkpoints' paths, None for a removed one."""
    removed = {"best": last_path, "last": best_path}.get(keep)
    if removed is not None and os.path.isfile(removed):
        os.remove(removed)
        _logger.info("--keep %s: removed %s", keep, removed)
    return dict(
        best_checkpoint=best_path if keep != "last" else None,
        last_checkpoint=last_path if keep != "best" else None,
    )


def _check_something_left(t: Training, state: TrainState) -> None:
    """A resumed run whose epochs are all done (or that stopped inside an epoch beyond the new end) has
    nothing to do: an error, not a silent success."""
    if state.epoch < t.epochs:
        return
    inside = f" and {state.step_in_epoch} batches of epoch {state.epoch + 1}" if state.step_in_epoch else ""
    raise NothingLeftToDo(
        f"--resume: {t.name} in {t.run_dir} has done {state.epoch} epochs{inside}; a run of {t.epochs} epochs has "
        f"nothing left to do: raise {t.length_option} to extend it"
    )


def _check_same_samples(saved: list[str], current: list[str], run_dir: str) -> None:
    """A resumed run must see the training data it started with (the sample order depends on it)."""
    if saved == current:
        return
    added, removed = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    changes = [
        f"{len(names)} {what} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
        for what, names in (("added", added), ("removed", removed))
        if names
    ]
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
    t: Training,
    model: nn.Module,
    scaler,
    state: TrainState,
    processes: ProcessContext,
    stopper: StopOnSignal,
    first_step: int,
) -> _Epoch:
    """One epoch (or its rest after a resume), or less when a stop is requested; first_step: the global
    step this process started at (its time, compilation included, is logged for a compiled network)."""
    model.train()
    if t.frozen_norms is not None:
        freeze_batch_norm_statistics(t.frozen_norms)
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
        rng_before = rng_state() if t.compiled else None
        try:
            with autocast_context(t.amp, processes.device):
                loss, images, skipped_now = t.loss(model, batch)
            stop, nonfinite = any_process([stopper.flag, not torch.isfinite(loss).item()], processes)
            if nonfinite:
                raise NonFiniteLoss(
                    f"the loss became {loss.item()} at epoch {state.epoch + 1}, batch {state.step_in_epoch + 1} (try "
                    "a lower --lr, --amp none or --clip-grad)"
                )
            t.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            close_compile_window()  # from here on the step runs to its end: the weights change together
        except StopRequested:  # the step is abandoned: the state from before it is saved
            progress.close()
            state.epoch_loss_sum, state.epoch_steps = loss_sum, steps
            return _Epoch(stopped=True, rng=rng_before)
        if t.clip_grad:
            scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        scaler.step(t.optimizer)
        scaler.update()
        if t.compiled and state.global_step == first_step and processes.is_main:
            _logger.info(
                "%s: torch.compile (%s) and the first step took %.1f s", t.name, t.compiled, time.perf_counter() - start
            )
        state.global_step += 1
        state.step_in_epoch += 1
        t.scheduler.step_update(num_updates=state.global_step)
        loss_sum += loss.item()
        steps += 1
        images_seen += images * processes.world_size
        skipped += skipped_now
        speed = images_seen / (time.perf_counter() - start)
        progress.set_postfix_str(
            f"loss {loss_sum / steps:.4f}, lr {t.optimizer.param_groups[0]['lr']:.2e}, {format_rate(speed)} img/s",
            refresh=False,
        )  # drawn at the bar's own interval
        if stop:
            progress.close()
            state.epoch_loss_sum = all_sum([loss_sum], processes)[0] / processes.world_size
            state.epoch_steps = steps
            return _Epoch(stopped=True)
    progress.close()
    loss_mean, skipped_all = all_sum([loss_sum / max(steps, 1), float(skipped)], processes)
    return _Epoch(False, loss_mean / processes.world_size, speed, int(skipped_all), steps)
