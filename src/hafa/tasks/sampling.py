"""The order of samples: a seeded permutation per epoch shared among processes (and resumable
mid-epoch) for training, a plain shard per process for evaluation."""

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError
from .processes import ProcessContext


class EpochSampler(Sampler):
    """This process's share of a seeded permutation per epoch (the same global order for any number
    of processes: global batch b is samples [b*G, (b+1)*G) of the permutation), starting at a batch
    when a run resumes mid-epoch. Every process gets the same number of samples (the tail is
    dropped when it does not fill a global batch)."""

    def __init__(self, num_samples: int, batch_size: int, processes: ProcessContext, seed: int, shuffle: bool = True):
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

    def __init__(self, num_samples: int, processes: ProcessContext):
        self.indices = list(range(processes.rank, num_samples, processes.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def evaluation_loader(
    dataset: Dataset, batch_size: int, workers: int, processes: ProcessContext, collate_fn
) -> DataLoader:
    """Batches of this process's shard of `dataset`, in order (workers seeded alike on every run)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), processes),
        num_workers=workers,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),
    )
