"""The checkpoint contract: every reader (eval, seg-eval, det-eval, predict, export, visualize) with a
checkpoint of each task and with a plain timm state dict gives either the exact model (the metric of
the training run's evaluation) or a refusal naming what is wrong; never a result from new weights."""

import json
import math
import os
import random
import shutil
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hafa.checkpoint import FORMAT, VERSION, CheckpointError, as_checkpoint, read_checkpoint, read_file, write_file
from hafa.cli import main
from hafa.data.folder import ImageFolderDataset
from hafa.errors import UserError
from hafa.tasks.classification import eval_transform
from hafa.tasks.classification_metrics import evaluate_classification
from hafa.tasks.networks import build_classifier_from_state_dict, build_model
from hafa.tasks.processes import ProcessContext
from hafa.tasks.saved import check_saved
from hafa.tools import export
from test_classification import QUICK as CLASSIFICATION_QUICK
from test_classification import write_dataset
from test_detection import SIZES as COCO_SIZES
from test_detection import TINY as DETECTION_QUICK
from test_detection import write_coco
from test_segmentation import QUICK as SEGMENTATION_QUICK
from test_segmentation import write_ade


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained checkpoint (best.pth) of each task, with its data."""
    root = tmp_path_factory.mktemp("runs")
    images = write_dataset(root / "images")
    ade = write_ade(root / "ade")
    coco = root / "coco"
    write_coco(coco, "train", COCO_SIZES[:4], seed=1)
    write_coco(coco, "val", COCO_SIZES[4:], seed=2)
    commands = dict(
        classification=["train", "--data", str(images), "--epochs", "1", *CLASSIFICATION_QUICK],
        segmentation=["seg-train", "--data", str(ade), "--num-classes", "3", "--iterations", "2", *SEGMENTATION_QUICK],
        detection=["det-train", "--data", str(coco), "--epochs", "1", *DETECTION_QUICK],
    )
    paths = dict(images=str(images), ade=str(ade), coco=str(coco))
    for task, command in commands.items():
        assert main([*command, "--model", "hafa_pvt_v2_b0", "--output", str(root / task)]) == 0
        paths[task] = str(root / task / "hafa_pvt_v2_b0" / "best.pth")
    timm_state_dict = root / "timm_pvt_v2_b0.pth"
    torch.save(timm.create_model("pvt_v2_b0", num_classes=3).state_dict(), timm_state_dict)
    paths["timm"] = str(timm_state_dict)
    return paths


def error_of(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_every_task_writes_format_1_with_the_complete_model(runs, task):
    saved = read_file(runs[task])
    assert (saved["format"], saved["version"], saved["task"]) == (FORMAT, VERSION, task)
    assert saved["model"]["name"] == "hafa_pvt_v2_b0"
    args = saved["model"]["args"]
    assert args["num_classes"] == 3
    backbone = args.get("backbone", args)
    assert backbone["stage_aggregation"] == ["laa", "laa", "sia"]
    assert {"cluster_ratio", "knn_k", "cluster_qkv"} <= set(backbone)
    assert len(saved["classes"]) == 3
    assert "recipe" in saved["settings"]
    assert saved["metrics"]
    checkpoint = read_checkpoint(runs[task], task, "test")
    model = build_model(checkpoint)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][name]), name


@pytest.mark.parametrize(
    ("command", "task", "metric"),
    [("eval", "classification", "top1"), ("seg-eval", "segmentation", "mIoU"), ("det-eval", "detection", "bbox_AP")],
)
def test_evaluation_reproduces_the_training_runs_metric(runs, tmp_path, command, task, metric):
    path = tmp_path / "metrics.json"
    assert main([command, "--checkpoint", runs[task], "--workers", "0", "--json", str(path)]) == 0
    evaluated = json.loads(path.read_text())
    assert evaluated[metric] == pytest.approx(read_file(runs[task])["metrics"][metric], abs=1e-9)


READERS = {
    "eval": ["eval", "--workers", "0"],
    "seg-eval": ["seg-eval", "--workers", "0"],
    "det-eval": ["det-eval", "--workers", "0"],
    "export": ["export"],
    "visualize": ["visualize", "--img-size", "64"],
}
TAKES = {"eval": "classification", "seg-eval": "segmentation", "det-eval": "detection"}
EVALUATED_BY = {"classification": "hafa eval", "segmentation": "hafa seg-eval", "detection": "hafa det-eval"}


@pytest.mark.parametrize(
    ("reader", "task"),
    [(reader, task) for reader in READERS for task in EVALUATED_BY if TAKES.get(reader, "classification") != task],
)
def test_a_checkpoint_of_another_task_gets_one_line_naming_the_command_that_takes_it(runs, capsys, reader, task):
    error = error_of([*READERS[reader], "--checkpoint", runs[task]], capsys)
    assert f"is a {task} checkpoint of hafa_pvt_v2_b0" in error
    assert f"(evaluate this one with {EVALUATED_BY[task]})" in error
    assert error.count("\n") == 1


@pytest.mark.parametrize("reader", ["seg-eval", "det-eval", "predict"])
def test_readers_that_need_a_recipe_refuse_a_plain_state_dict(runs, capsys, reader):
    error = error_of([reader, "--checkpoint", runs["timm"]], capsys)
    assert "is a plain state dict" in error


def test_a_timm_state_dict_is_evaluated_exactly_with_model_and_class_count(runs, tmp_path, capsys):
    path = tmp_path / "m.json"
    argv = ["eval", "--checkpoint", runs["timm"], "--data", runs["images"], "--workers", "0"]
    assert main([*argv, "--model", "pvt_v2_b0", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["images"] == 12
    assert "say which model it holds with --model" in error_of(argv, capsys)
    error = error_of([*argv, "--model", "hafa_pvt_v2_b0"], capsys)  # a baseline's weights as the HAFA model
    assert "does not hold exactly the weights of hafa_pvt_v2_b0" in error
    assert "missing" in error
    assert "downsample" in error  # the SIA and LAA tensors it lacks
    error = error_of([*argv, "--model", "pvt_v2_b0", "--num-classes", "5"], capsys)
    assert "--num-classes 5, but" in error


def test_plain_state_dicts_need_model_and_class_count_and_must_be_complete(runs):
    state_dict = read_file(runs["timm"])
    with pytest.raises(CheckpointError, match="--model and how many classes"):
        build_classifier_from_state_dict(state_dict, "timm.pth", "pvt_v2_b0", None)
    with pytest.raises(CheckpointError, match="missing 2 .*head.weight"):
        build_classifier_from_state_dict(state_dict, "timm.pth", "pvt_v2_b0", 1000)
    model = build_classifier_from_state_dict(state_dict, "timm.pth", "pvt_v2_b0", 3)
    assert torch.equal(model.head.weight, state_dict["head.weight"])
    state_dict.pop("head.bias")
    with pytest.raises(CheckpointError, match=r"missing 1 \(head.bias\)"):
        build_classifier_from_state_dict(state_dict, "timm.pth", "pvt_v2_b0", 3)


def test_model_options_that_contradict_the_checkpoint_are_an_error_naming_both(runs, capsys):
    base = ["eval", "--checkpoint", runs["classification"], "--workers", "0"]
    error = error_of([*base, "--stage-aggregation", "conv", "conv", "conv"], capsys)
    assert "--stage-aggregation conv conv conv vs the checkpoint's ['laa', 'laa', 'sia']" in error
    assert "--model hafa_pvt_v2_b1 vs the checkpoint's hafa_pvt_v2_b0" in error_of(
        [*base, "--model", "hafa_pvt_v2_b1"], capsys
    )
    assert "--num-classes 10 vs the checkpoint's 3" in error_of([*base, "--num-classes", "10"], capsys)
    assert "--knn-k 7 vs the checkpoint's 5" in error_of([*base, "--knn-k", "7"], capsys)


def test_export_and_visualize_use_the_checkpoints_model(runs, tmp_path, capsys):
    model = export.build_model(None, runs["classification"])
    saved = read_file(runs["classification"])
    assert model.head.out_features == 3
    assert torch.equal(model.head.weight, saved["state_dict"]["head.weight"])
    picture = tmp_path / "v.png"
    assert main(["visualize", "--checkpoint", runs["classification"], "--img-size", "64", "-o", str(picture)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert picture.exists()
    assert "say which model it holds" in error_of(
        ["export", "--checkpoint", runs["timm"], "--model", "pvt_v2_b0"], capsys
    )


def test_incomplete_extra_legacy_and_corrupt_files_are_refused(runs, tmp_path, capsys):
    saved = read_file(runs["classification"])
    broken = dict(saved, state_dict={k: v for k, v in saved["state_dict"].items() if k != "head.bias"})
    write_file(str(tmp_path / "missing.pth"), broken)
    error = error_of(["eval", "--checkpoint", str(tmp_path / "missing.pth"), "--workers", "0"], capsys)
    assert "does not hold exactly the weights of hafa_pvt_v2_b0: missing 1 (head.bias)" in error
    extra = dict(saved, state_dict=dict(saved["state_dict"], stray=torch.zeros(1)))
    write_file(str(tmp_path / "extra.pth"), extra)
    assert "extra 1 (stray)" in error_of(["predict", "--checkpoint", str(tmp_path / "extra.pth")], capsys)
    legacy = dict(model=saved["state_dict"], config=saved["settings"])
    write_file(str(tmp_path / "legacy.pth"), legacy)
    assert "written by an older hafa" in error_of(["eval", "--checkpoint", str(tmp_path / "legacy.pth")], capsys)
    newer = dict(saved, version=VERSION + 1)
    write_file(str(tmp_path / "newer.pth"), newer)
    assert "format version 2" in error_of(["seg-eval", "--checkpoint", str(tmp_path / "newer.pth")], capsys)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert "is not a PyTorch checkpoint" in error_of(["det-eval", "--checkpoint", str(tmp_path / "junk.pth")], capsys)
    assert "checkpoint file not found" in error_of(["export", "--checkpoint", str(tmp_path / "none.pth")], capsys)


class CarriesCode:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


def test_unreadable_files_get_one_line_saying_why(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("epochs: 3\nnot a checkpoint\n")
    torch.save({"model": CarriesCode()}, tmp_path / "code.pth")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:2000])
    expected = {
        "empty.pth": "is empty (0 bytes), not a checkpoint",
        "text.pth": "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
        "code.pth": "holds Python objects other than tensors and plain data (loading it could run code)",
        "cut.pth": "is damaged: it ends early or its zip archive is corrupt",
    }
    for name, message in expected.items():
        error = error_of(["eval", "--checkpoint", str(tmp_path / name), "--data", "x"], capsys)
        assert message in error, name
        assert error.count("\n") == 1, name
        assert "weights_only=False" not in error  # no advice to load code


def to_folder_masks(ade_masks, folder, shift: bool):
    """The ADE20K masks (0 = ignore, class k = k + 1) as folder-pair masks: shifted to the classes 0..K-1
    (255 = ignore) when `shift`, else copied as they are."""
    os.makedirs(folder)
    for name in sorted(os.listdir(ade_masks)):
        values = np.array(Image.open(os.path.join(ade_masks, name))).astype(np.int64)
        if shift:
            values = np.where(values == 0, 255, values - 1)
        Image.fromarray(values.astype(np.uint8)).save(os.path.join(folder, name))
    return folder


def test_seg_eval_on_masks_of_another_layout_needs_their_convention_and_then_equals_the_ade_result(
    runs, tmp_path, capsys
):
    ade = runs["ade"]
    reference, shifted, as_is = tmp_path / "ade.json", tmp_path / "shifted.json", tmp_path / "as_is.json"
    base = ["seg-eval", "--checkpoint", runs["segmentation"], "--workers", "0"]
    assert main([*base, "--data", ade, "--json", str(reference)]) == 0
    images = os.path.join(ade, "images", "validation")
    folders = ["--images", images, "--masks"]
    shifted_masks = to_folder_masks(os.path.join(ade, "annotations", "validation"), tmp_path / "shifted", True)
    error = error_of([*base, *folders, str(shifted_masks)], capsys)
    assert "was trained on masks in the ADE20K layout (--data) with reduce_zero_label" in error
    assert "these masks are in image / mask folder pairs" in error
    assert "--reduce-zero-label or --no-reduce-zero-label" in error
    assert main([*base, *folders, str(shifted_masks), "--no-reduce-zero-label", "--json", str(shifted)]) == 0
    original_masks = to_folder_masks(os.path.join(ade, "annotations", "validation"), tmp_path / "as_is", False)
    assert main([*base, *folders, str(original_masks), "--reduce-zero-label", "--json", str(as_is)]) == 0
    expected = json.loads(reference.read_text())
    for path in (shifted, as_is):
        got = json.loads(path.read_text())
        assert (got["mIoU"], got["mAcc"], got["aAcc"]) == (expected["mIoU"], expected["mAcc"], expected["aAcc"])


def test_seg_eval_with_no_labelled_pixel_is_an_error_not_nan(runs, tmp_path, capsys):
    ignored = tmp_path / "ignored"
    os.makedirs(ignored)
    images = os.path.join(runs["ade"], "images", "validation")
    for name in os.listdir(images):
        size = Image.open(os.path.join(images, name)).size
        Image.new("L", size, 255).save(ignored / (os.path.splitext(name)[0] + ".png"))
    argv = ["seg-eval", "--checkpoint", runs["segmentation"], "--images", images, "--masks", str(ignored)]
    error = error_of([*argv, "--no-reduce-zero-label", "--workers", "0"], capsys)
    assert "no pixel of the 2 evaluated masks is labelled (every value is ignore): mIoU is undefined" in error


def test_a_detector_draws_a_very_thin_image(runs, tmp_path, capsys):
    for size in ((5000, 20), (20, 5000)):
        image = tmp_path / f"strip_{size[0]}.png"
        Image.new("RGB", size, (120, 60, 30)).save(image)
        output = tmp_path / f"strip_{size[0]}_drawn.png"
        assert main(["predict", "--checkpoint", runs["detection"], "--image", str(image), "-o", str(output)]) == 0
        assert "detections" in capsys.readouterr().out
        with Image.open(output) as drawn:
            assert max(drawn.size) == 2048


def test_visualize_draws_a_checkpoint_at_another_cluster_ratio(runs, tmp_path, capsys):
    picture = tmp_path / "v.png"
    argv = ["visualize", "--checkpoint", runs["classification"], "--img-size", "64", "-o", str(picture)]
    assert main([*argv, "--cluster-ratio", "0.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert picture.exists()
    error = error_of([*argv, "--cluster-ratio", "0"], capsys)
    assert "--cluster-ratio must be a number > 0 and <= 1 (clusters per token), not 0" in error


# ---------------------------------------------------------------- metadata: read as the command line is


@pytest.fixture
def opened(tmp_path):
    """The files opened while the test runs (an audit hook: torch.load, timm's checkpoint loading and
    pretrained_cfg files all open() them)."""
    seen = []
    _OPEN_LOG.append(seen)
    yield seen
    _OPEN_LOG.remove(seen)


_OPEN_LOG: list[list[str]] = []


def _record_opens(event, args):
    if event == "open" and _OPEN_LOG and isinstance(args[0], str):
        for seen in _OPEN_LOG:
            seen.append(os.path.realpath(args[0]))


sys.addaudithook(_record_opens)


def with_field(content: dict, path: tuple, value) -> dict:
    """content with the field at `path` set to value (the mappings on the way copied, the weights shared)."""
    changed = dict(content)
    inner = changed
    for key in path[:-1]:
        inner[key] = dict(inner[key])
        inner = inner[key]
    inner[path[-1]] = value
    return changed


def metadata_fields(value, prefix=()):
    """Paths of every field of a checkpoint's metadata (its weights' and training state's insides left out)."""
    if prefix:
        yield prefix
    if isinstance(value, dict) and prefix[:1] not in {("state_dict",), ("metrics",), *map(tuple, TRAINING_STATE)}:
        for key, child in value.items():
            yield from metadata_fields(child, (*prefix, key))


TRAINING_STATE = [["optimizer"], ["scheduler"], ["scaler"], ["train_state"], ["rng"], ["samples"]]


def decoy_file(root) -> str:
    """A file a checkpoint might name for a command to read: a complete timm state dict."""
    path = os.path.join(root, "decoy.pth")
    torch.save(timm.create_model("pvt_v2_b0", num_classes=3).state_dict(), path)
    return os.path.realpath(path)


def test_edited_metadata_gets_one_line_naming_the_field_and_no_other_file_is_read(runs, tmp_path, capsys, opened):
    saved = read_file(runs["classification"])
    decoy = decoy_file(tmp_path)
    args = saved["model"]["args"]
    baseline_with_hafa_args = with_field(
        with_field(saved, ("model", "name"), "pvt_v2_b0"), ("settings", "model"), "pvt_v2_b0"
    )
    cases = [
        (baseline_with_hafa_args, "model.args: 'stage_aggregation' is not an argument a hafa checkpoint records here"),
        (with_field(saved, ("model", "args"), "abc"), "model.args must be a mapping of keyword arguments"),
        (
            with_field(saved, ("state_dict",), list(saved["state_dict"].values())),
            "state_dict must be a mapping of names",
        ),
        (
            with_field(saved, ("settings", "recipe", "img_size"), 20),
            "settings.recipe: img_size must be a whole number from 32 to 4096 (the models end at stride 32), not 20",
        ),
        (
            with_field(saved, ("model", "args"), dict(args, checkpoint_path=decoy)),
            "model.args: 'checkpoint_path' is not an argument a hafa checkpoint records here (it records: num_classes, "
            "drop_path_rate, drop_rate, stage_aggregation",
        ),
        (
            with_field(saved, ("model", "args"), dict(args, pretrained=True, pretrained_cfg_overlay=dict(file=decoy))),
            "model.args: 'pretrained' is not an argument",
        ),
        (with_field(saved, ("model", "args", "num_classes"), 5), "the class counts differ (classes 3, model.args"),
        (with_field(saved, ("settings", "amp"), "fp8"), "settings.amp must be one of none, bf16, fp16"),
        (
            with_field(saved, ("settings", "hafa_options"), dict(knn_k=0)),
            "settings.hafa_options.knn_k must be a whole number >= 1",
        ),
        (with_field(saved, ("settings", "bogus"), 1), "settings has unknown fields: 'bogus'"),
        (with_field(saved, ("bogus",), 1), "unknown field str 'bogus'"),
        (with_field(saved, ("model", "name"), "no_such_model"), "model.name 'no_such_model' is not a model timm"),
        (
            with_field(saved, ("model", "args", "stage_aggregation"), ["laa", "laa", "bogus"]),
            "model.args.stage_aggregation must be a list of 3 values, each one of conv, laa, sia",
        ),
    ]
    for i, (content, message) in enumerate(cases):
        path = tmp_path / f"edited{i}.pth"
        write_file(str(path), content)
        for argv in (["eval", "--workers", "0"], ["predict"], ["export", "-o", str(tmp_path / "x.onnx")]):
            error = error_of([*argv, "--checkpoint", str(path)], capsys)
            assert f"{path}: {message}" in error or message in error, (argv, message, error)
            assert error.count("\n") == 1, error
    assert decoy not in opened  # a checkpoint never decides what other file is read


def test_non_finite_weights_are_refused_and_so_is_an_evaluation_that_is_not_finite(runs, tmp_path, capsys):
    saved = read_file(runs["classification"])
    broken = dict(saved["state_dict"], **{"head.weight": torch.full_like(saved["state_dict"]["head.weight"], math.nan)})
    path = tmp_path / "nan.pth"
    write_file(str(path), dict(saved, state_dict=broken))
    error = error_of(["eval", "--checkpoint", str(path), "--workers", "0"], capsys)
    assert "holds weights that are not finite (NaN or infinity) in 1 tensors (head.weight)" in error
    model = build_model(read_checkpoint(runs["classification"], "classification", "test"))
    model.head.bias.data[0] = math.inf  # finite weights can still give non-finite logits: the evaluation says so
    data = ImageFolderDataset(runs["images"], "val", eval_transform(saved["settings"]["recipe"]))
    with pytest.raises(UserError, match="the evaluation's loss is nan: the model's logits are not finite"):
        evaluate_classification(model, data, 4, 0, ProcessContext())


# (task, the fields the fuzz changes: all for classification; for the dense tasks their own)
FUZZED = {
    "classification": lambda path: True,
    "segmentation": lambda path: path[0] != "settings" or path[1:2] not in {("recipe",), ("hafa_options",)},
    "detection": lambda path: path[0] != "settings" or path[1:2] not in {("recipe",), ("hafa_options",)},
}
# Values of another type than most fields', and values out of most fields' ranges.
WRONG_TYPES = [None, "abc", True, [1, 2], ["a"], {"x": 1}, {}]
OUT_OF_RANGE = [-1, 0, 2.5, 1e9, math.nan, math.inf, ""]


@pytest.mark.parametrize("task", FUZZED)
def test_fuzz_every_field_of_a_checkpoint_gives_the_model_or_one_line(runs, tmp_path, task, opened):
    """Every metadata field set to a wrong type, an out-of-range value or the path of another file, and an
    unknown key added to every mapping: the exact model or a one-line UserError, never another exception,
    never another file read."""
    saved = read_file(runs[task])
    decoy = decoy_file(tmp_path)
    rng = random.Random(task)
    cases = []
    for path in metadata_fields(saved):
        if FUZZED[task](path):
            cases += [(path, rng.choice([*WRONG_TYPES, decoy])), (path, rng.choice(OUT_OF_RANGE))]
            if isinstance(eval_path(saved, path), dict):
                cases.append(((*path, "unknown_key"), decoy))
    for args_path in (("model", "args"), ("model", "args", "backbone")):
        if isinstance(eval_path(saved, args_path), dict):
            for key, value in (
                ("checkpoint_path", decoy),
                ("pretrained", True),
                ("pretrained_cfg_overlay", {"file": decoy}),
            ):
                cases.append(((*args_path, key), value))
    refused = 0
    cases.append((("model", "args", "num_classes"), 3.0))  # allowed: the model is built with 3 classes
    for path, value in cases:
        model, refusal = model_or_refusal(with_field(saved, path, value))
        if refusal is None:  # an allowed value (a text where a text goes, 0 dropout ...): the model is complete
            assert model.state_dict().keys() == saved["state_dict"].keys(), (path, value)
            continue
        refused += 1
        assert "\n" not in refusal, (path, value, refusal)
        assert refusal.startswith("edited.pth"), (path, value, refusal)
    assert refused > 0.8 * len(cases), (refused, len(cases))
    assert decoy not in opened


def test_a_resume_reads_the_training_state_through_the_same_checks(runs, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(os.path.dirname(runs["classification"]), out / "hafa_pvt_v2_b0")
    last = out / "hafa_pvt_v2_b0" / "last.pth"
    saved = read_file(str(last))
    argv = ["train", "--data", runs["images"], "--epochs", "2", *CLASSIFICATION_QUICK, "--model", "hafa_pvt_v2_b0"]
    for content, message in (
        (with_field(saved, ("train_state", "bogus"), 1), "train_state must hold epoch, step_in_epoch, global_step"),
        (with_field(saved, ("train_state", "epoch"), -1), "train_state.epoch must be a whole number >= 0, not -1"),
        ({k: v for k, v in saved.items() if k != "rng"}, "lacks rng: it is not a last.pth a run can be resumed from"),
        (with_field(saved, ("optimizer",), "abc"), "optimizer must be a mapping (a state dict), not str 'abc'"),
        (with_field(saved, ("settings", "recipe", "img_size"), 20), "settings.recipe: img_size must be a whole number"),
    ):
        write_file(str(last), content)
        error = error_of([*argv, "--output", str(out), "--resume"], capsys)
        assert message in error, (message, error)
        assert error.count("\n") == 1


def model_or_refusal(content: dict):
    """(the model a checkpoint of this content rebuilds, None) or (None, the UserError's message): any
    other exception fails the test."""
    try:
        return build_model(check_saved(as_checkpoint(content, "edited.pth"))), None
    except UserError as error:
        return None, str(error)


def eval_path(content, path):
    """The field at `path`, None where there is none."""
    for key in path:
        if not isinstance(content, dict) or key not in content:
            return None
        content = content[key]
    return content
