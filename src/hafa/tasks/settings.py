"""The settings of a training run, one dataclass per task: built once from the recipe and the options,
saved in the checkpoint (as a dict) and read back from it by the commands that evaluate or predict."""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

Settings = TypeVar("Settings", bound="RunSettings")


@dataclass(kw_only=True)
class RunSettings:
    """What every training run is: a model on data with a recipe (the task's recipe settings, checked
    against its defaults), in a run folder."""

    model: str
    recipe: dict[str, Any]
    run_dir: str
    resume: bool = False
    hafa_options: dict[str, Any] = field(default_factory=dict)  # HAFA constructor options (ignored by baselines)
    amp: str = "none"
    workers: int = 2
    device: str | None = None

    @classmethod
    def from_dict(cls: type[Settings], values: dict) -> Settings:
        """Settings saved in a checkpoint (keys this version does not know are left out)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class ClassificationSettings(RunSettings):
    data: str  # ROOT with ROOT/{train,val}/<class>/<image>
    init_from: str | None = None
    num_classes: int | None = None  # checked against the data's class count when given
    grad_checkpointing: bool = False


@dataclass(kw_only=True)
class SegmentationSettings(RunSettings):
    data: dict[str, Any]  # as hafa.data.segmentation.data_pairs takes it: the ADE20K layout or folder pairs
    num_classes: int
    reduce_zero_label: bool
    class_names: list[str]
    backbone_checkpoint: str | None = None
    sync_bn: bool = True
    norm_eval: bool = False


@dataclass(kw_only=True)
class DetectionSettings(RunSettings):
    data: str  # COCO ROOT
    train_split: str
    val_split: str
    init_from: str | None = None
    sync_bn: bool = True
    norm_eval: bool = False
    category_ids: list[int] = field(default_factory=list)  # the training json's, in class order
