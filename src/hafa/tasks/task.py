"""What a task is: one description (a `Task`) that the one training job (`hafa.tasks.job`) runs.

A task says what is particular to it: its settings and recipes, the options that name its data and
how that data is prepared and checked, its datasets, its network's arguments and how a run starts
it, its learning-rate schedule, its loss, its evaluation, the score that chooses the best epoch, the
curves drawn and the summary printed. Everything else (the settings every run has, the models and
their baselines, resume checks, the training loop, checkpoints) is the job's, the same for every task.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from .processes import ProcessContext
from .run_log import print_best_scores
from .run_settings import RunSettings
from .sampling import EpochSampler

# loss(network, batch) -> (the loss, images in the batch, unreadable files skipped)
Loss = Callable[[nn.Module, Any], tuple[torch.Tensor, int, int]]


@dataclass(kw_only=True)
class TrainingData:
    """The data of one training run, as a task reads it."""

    train: Dataset
    val: Dataset
    collate: Callable  # makes a batch of `train` samples
    classes: list[str]  # the class names the checkpoint records
    sample_names: list[str]  # the training files, in order: a resumed run must see the same
    found_settings: dict[str, Any] = field(default_factory=dict)  # settings the data decides (detection's ids)


class Task(ABC):
    """One task's description; a subclass fills in what its task does (see the module docstring)."""

    name: ClassVar[str]  # as checkpoints name the task: "classification", "segmentation", "detection"
    settings_class: ClassVar[type[RunSettings]]  # its run settings (and, as settings_class.RECIPE, its recipe)
    recipe_for_own_data: ClassVar[str]  # the shipped recipe a run on the user's data starts from
    recipe_for_embedded_data: ClassVar[str]  # ... and a run on the embedded data
    recipe_options: ClassVar[tuple[str, ...]]  # recipe keys the training command has an option for, besides
    # --batch-size, --lr and --seed
    network_kind: ClassVar[str]  # what --model names: "model" (a classifier) or "backbone"
    dense: ClassVar[bool]  # few images per GPU: BatchNorm synchronised by default, --norm-eval
    score: ClassVar[str]  # the validation metric that chooses the best epoch
    score_name: ClassVar[str]  # that metric as the summary names it
    curves: ClassVar[dict[str, list[str]]]  # the curves' panels: title -> the log's columns
    length_option: ClassVar[str] = "--epochs"  # the option that sets a run's length

    @abstractmethod
    def settings_from_options(self, args) -> dict[str, Any]:
        """The task's own settings fields as the command line gives them (the data as named, before
        anything is read or written)."""

    @abstractmethod
    def uses_embedded_data(self, chosen: dict[str, Any]) -> bool:
        """Whether the settings fields `chosen` name the embedded data."""

    @abstractmethod
    def prepare_data(self, chosen: dict[str, Any], processes: ProcessContext, check_files: bool) -> dict[str, Any]:
        """The settings fields with the data made ready: the embedded data written (by the main process)
        and named, paths made absolute, and (check_files) every file's header read."""

    def epochs(self, recipe: dict, batches_per_epoch: int) -> int:
        """How many epochs the recipe's length is."""
        return recipe["epochs"]

    @abstractmethod
    def datasets(self, settings: RunSettings, processes: ProcessContext) -> TrainingData:
        """The training and validation data of a run."""

    @abstractmethod
    def network_arguments(self, settings: RunSettings, data: TrainingData) -> dict:
        """The network's complete arguments (hafa.tasks.networks.create_network), which the checkpoint records."""

    @abstractmethod
    def prepare_network(self, network: nn.Module, settings: RunSettings, processes: ProcessContext) -> None:
        """What a run does to its new network before it trains (loading the checkpoint it starts from ...)."""

    def starting_checkpoint(self, settings: RunSettings) -> str | None:
        """The checkpoint a run's network starts from (--init-from), None for a start from scratch."""
        return settings.init_from

    def compiled_part(self, network: nn.Module) -> nn.Module:
        """The part of the network that --compile compiles."""
        return network

    @abstractmethod
    def scheduler(self, optimizer: torch.optim.Optimizer, recipe: dict, *, updates_per_epoch: int, epochs: int):
        """The recipe's learning-rate schedule (a timm scheduler, stepped every update)."""

    @abstractmethod
    def loss(self, settings: RunSettings, data: TrainingData, device: torch.device) -> Loss:
        """The training loss of a batch."""

    @abstractmethod
    def evaluate(
        self, network: nn.Module, data: TrainingData, settings: RunSettings, processes: ProcessContext
    ) -> dict[str, float]:
        """The validation metrics (`score` among them), every process evaluating its share."""

    @abstractmethod
    def curves_note(self, recipe: dict) -> str:
        """What the curves measure, written under them."""

    def start_message(self, settings: RunSettings, data: TrainingData, sampler: EpochSampler, epochs: int) -> str:
        """A line printed before a new run trains (none when empty)."""
        return ""

    def print_summary(self, results: list[dict]) -> None:
        """The results of the runs of one command, printed when they end."""
        print_best_scores(results, self.score_name)
