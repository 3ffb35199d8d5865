"""What a hafa checkpoint may contain, read as the command line is read (docs/tasks.md).

hafa.checkpoint checks the file's fields and their types; here their values: model.name must be a
model timm knows; model.args only what the task layer writes itself (networks.check_network_arguments:
the backbone's size and rates its constructor names, the HAFA options, the head's widths), each in
its range; settings re-checked with the settings specs (run_settings.RunSettings.from_saved); the class
count the same in model.args, settings and classes. Anything else is one line naming the field and
the value (a UserError). A checkpoint is data: it never decides what other file is read or which
keyword reaches timm.create_model.
"""

import timm

from ..checkpoint import Checkpoint, CheckpointError, read_checkpoint, read_checkpoint_or_state_dict
from .networks import check_network_arguments
from .run_settings import TASK_SETTINGS


def _class_counts(checkpoint: Checkpoint, settings) -> dict[str, int]:
    """Every class count a checkpoint states, by field: all must be len(classes)."""
    args = checkpoint.model_args
    counts = {"classes": len(checkpoint.classes)}
    if "num_classes" in args or checkpoint.task != "classification":
        counts["model.args.num_classes"] = args["num_classes"]
    if getattr(settings, "num_classes", None) is not None:
        counts["settings.num_classes"] = settings.num_classes
    if checkpoint.task == "detection" and settings.category_ids:
        counts["settings.category_ids"] = len(settings.category_ids)
    return counts


def check_saved(checkpoint: Checkpoint) -> Checkpoint:
    """A checkpoint whose metadata passed the command line's checks (see the module docstring), its
    arguments and settings converted to their types (the settings' defaults filled in); a UserError
    naming the field otherwise."""
    where, name = checkpoint.path, checkpoint.model_name
    if name not in timm.list_models():
        raise CheckpointError(f"{where}: model.name {name!r} is not a model timm (with hafa's models) knows")
    settings = TASK_SETTINGS[checkpoint.task].from_saved(checkpoint.settings, f"{where}: settings")
    if settings.model != name:
        raise CheckpointError(f"{where}: settings.model {settings.model!r} is not the model.name {name!r}")
    args = check_network_arguments(checkpoint.task, name, checkpoint.model_args, f"{where}: model.args")
    checkpoint.model_args = args
    if checkpoint.task == "classification" and "num_classes" not in checkpoint.model_args:
        raise CheckpointError(f"{where}: model.args lacks num_classes (a classifier's class count)")
    counts = _class_counts(checkpoint, settings)
    if len(set(counts.values())) > 1:
        stated = ", ".join(f"{field} {count}" for field, count in counts.items())
        raise CheckpointError(f"{where}: the class counts differ ({stated}); they must be the same")
    checkpoint.settings = settings.as_dict()
    return checkpoint


def read_saved(path: str, task: str, command: str) -> Checkpoint:
    """A checkpoint of `task` for `command`, its metadata checked (hafa.checkpoint.read_checkpoint, then
    check_saved)."""
    return check_saved(read_checkpoint(path, task, command))


def read_saved_or_state_dict(path: str) -> Checkpoint | dict:
    """A hafa checkpoint with its metadata checked, or the plain state dict the file holds."""
    content = read_checkpoint_or_state_dict(path)
    return check_saved(content) if isinstance(content, Checkpoint) else content
