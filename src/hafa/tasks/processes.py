"""This process's place among the training processes (torchrun / DistributedDataParallel) and the
collectives the tasks use: sums, barriers, gathering and broadcasting objects."""

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..spec import Device


@dataclass
class ProcessContext:
    """This process's place among the training processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK):
    its rank, how many there are, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # in a process group (torchrun), also when it is the only process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another env:// launcher) started this process: it sets these variables."""
    return all(name in os.environ for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"))


def init_processes(device: str | None = None) -> ProcessContext:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU), even as its only
    process (then DistributedDataParallel and SyncBatchNorm run as they would on more). device: cpu, cuda
    or cuda:N (one process; under torchrun each process takes cuda:LOCAL_RANK), default cuda when available."""
    Device().check(device, "--device")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        index = int(device.partition(":")[2]) if device and ":" in device else local_rank
        torch.cuda.set_device(index)
        target = torch.device("cuda", index)
    else:
        target = torch.device("cpu")
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ProcessContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=target, distributed=dist.is_initialized()
    )


def close_processes() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(processes: ProcessContext) -> None:
    if processes.distributed:
        dist.barrier()


def all_sum(values: list[float], processes: ProcessContext) -> list[float]:
    """Sum numbers over the processes (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=processes.device)
    if processes.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def any_process(flags: list[bool], processes: ProcessContext) -> list[bool]:
    """For each flag, whether it is set in any process (one collective for all of them)."""
    return [total > 0 for total in all_sum([float(flag) for flag in flags], processes)]


def gather_objects(value: Any, processes: ProcessContext) -> list:
    """Every process's `value` (any picklable object), in rank order, on every process."""
    if not processes.distributed:
        return [value]
    values = [None] * processes.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value: Any, processes: ProcessContext) -> Any:
    """The main process's `value` (any picklable object) on every process."""
    if not processes.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
