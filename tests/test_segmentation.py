import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hafa import HafaOptions
from hafa.cli import main
from hafa.data.segmentation import (
    IGNORE_INDEX,
    EvalTransform,
    LabelMapping,
    SegmentationDataset,
    TrainTransform,
    ade20k_pairs,
    rescale_size,
)
from hafa.tasks import segmentation as seg
from hafa.tasks.job import build_optimizer
from hafa.tasks.networks import create_network, segmenter_arguments
from hafa.tasks.processes import ProcessContext
from hafa.tasks.run_settings import SEGMENTATION_RECIPE, load_recipe
from hafa.tasks.segmentation_metrics import confusion_matrix, evaluate_segmentation, segmentation_metrics

SIZES = [(70, 101), (90, 75), (67, 118), (100, 83)]  # (height, width): non-square, none a multiple of 32
COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255)], np.uint8)  # class k is pure colour k
QUICK = [
    "--workers",
    "0",
    "--batch-size",
    "2",
    "--crop-size",
    "72",
    "100",
    "--set",
    "scale=[160,80]",
    "eval_crop=[64,64]",
    "eval_stride=[40,40]",
]


def draw(height, width, rng):
    """Class ids (0..2) of a scene: background 0 and two rectangles, with a ring of unlabelled pixels."""
    classes = np.zeros((height, width), np.int64)
    unlabelled = np.zeros((height, width), bool)
    for k in (1, 2):
        h, w = int(rng.integers(height // 4, height // 2)), int(rng.integers(width // 4, width // 2))
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        unlabelled[max(top - 1, 0) : top + h + 1, max(left - 1, 0) : left + w + 1] = True
        classes[top : top + h, left : left + w] = k
        unlabelled[top : top + h, left : left + w] = False
    return classes, unlabelled


def write_ade(root, sizes=SIZES, val_sizes=SIZES[:2], image_ext=".jpg"):
    """ROOT/images/{training,validation}/*, ROOT/annotations/...: mask 0 = ignore, class k -> k + 1."""
    rng = np.random.default_rng(0)
    for folder, split_sizes in (("training", sizes), ("validation", val_sizes)):
        os.makedirs(root / "images" / folder, exist_ok=True)
        os.makedirs(root / "annotations" / folder, exist_ok=True)
        for i, (height, width) in enumerate(split_sizes):
            classes, unlabelled = draw(height, width, rng)
            Image.fromarray(COLOURS[classes]).save(root / "images" / folder / f"img_{i}{image_ext}")
            Image.fromarray(np.where(unlabelled, 0, classes + 1).astype(np.uint8)).save(
                root / "annotations" / folder / f"img_{i}.png"
            )
    return root


def write_folders(root, sizes=SIZES):
    """ROOT/{images,masks}/{train,val}/*: mask values are the classes, 255 = ignore."""
    rng = np.random.default_rng(1)
    for split, split_sizes in (("train", sizes), ("val", sizes[:2])):
        os.makedirs(root / "images" / split, exist_ok=True)
        os.makedirs(root / "masks" / split, exist_ok=True)
        for i, (height, width) in enumerate(split_sizes):
            classes, unlabelled = draw(height, width, rng)
            Image.fromarray(COLOURS[classes]).save(root / "images" / split / f"{i}.png")
            Image.fromarray(np.where(unlabelled, 255, classes).astype(np.uint8)).save(
                root / "masks" / split / f"{i}.png"
            )
    return root


def folder_args(root):
    return [
        "--images",
        str(root / "images" / "train"),
        "--masks",
        str(root / "masks" / "train"),
        "--val-images",
        str(root / "images" / "val"),
        "--val-masks",
        str(root / "masks" / "val"),
        "--num-classes",
        "3",
    ]


# ---------------------------------------------------------------- model


def semantic_fpn(name: str, num_classes: int) -> torch.nn.Module:
    args = segmenter_arguments(name, num_classes=num_classes, options=HafaOptions(), drop_path_rate=0.0, dropout=0.1)
    return create_network("segmentation", name, args)


@pytest.mark.parametrize("name", ["hafa_pvt_v2_b0", "pvt_v2_b0", "swin_tiny_patch4_window7_224"])
def test_semantic_fpn_gives_logits_at_any_input_size(name):
    model = semantic_fpn(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 67, 101)).shape == (2, 5, 67, 101)


def test_hafa_backbones_are_segmentation_models_pytorch_encoders():
    """smp's timm universal encoder (`tu-`) builds our models (on the meta device first) and trains
    through them; its FPN asks for sizes divisible by 32, which is why `hafa seg-train` has its own head."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.FPN(encoder_name="tu-hafa_pvt_v2_b0", encoder_weights=None, classes=4)
    assert model.encoder.out_channels[-4:] == [32, 64, 160, 256]
    logits = model(torch.randn(2, 3, 128, 160))
    logits.mean().backward()
    assert logits.shape == (2, 4, 128, 160)
    assert model.encoder.model.model.stages[3].downsample.score.weight.grad.abs().sum() > 0  # SIA learns
    with pytest.raises(RuntimeError, match="divisible by 32"):
        model(torch.randn(1, 3, 250, 310))
    with torch.no_grad():
        assert semantic_fpn("hafa_pvt_v2_b0", num_classes=4).eval()(torch.randn(1, 3, 250, 310)).shape == (
            1,
            4,
            250,
            310,
        )


def test_semantic_fpn_size_matches_the_papers():
    model = semantic_fpn("pvt_tiny", num_classes=150)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 17.0  # PVT paper, Table 3


# ---------------------------------------------------------------- metrics


def test_metrics_by_hand_and_on_a_perfect_prediction():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 1]])
    matrix = confusion_matrix(predicted, labels, 4)
    assert matrix.sum() == 7
    assert matrix[0, 1] == 1
    metrics = segmentation_metrics(matrix, ["a", "b", "c", "d"])
    assert metrics["per_class_IoU"]["a"] == pytest.approx(50.0)
    assert metrics["per_class_IoU"]["b"] == pytest.approx(75.0)
    assert np.isnan(metrics["per_class_IoU"]["d"])  # neither present nor predicted: left out of the mean
    assert metrics["mIoU"] == pytest.approx((50 + 75 + 100) / 3)
    assert metrics["aAcc"] == pytest.approx(600 / 7)
    perfect = segmentation_metrics(confusion_matrix(labels.clamp(max=3), labels, 4), list("abcd"))
    assert perfect["mIoU"] == perfect["mAcc"] == perfect["aAcc"] == 100.0


class ColourOracle(torch.nn.Module):
    """Logits = the normalised image: class k (pure colour k) wins exactly where the image has colour k."""

    def forward(self, images):
        return images


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluation_of_an_exact_prediction_gives_miou_100(tmp_path, mode):
    root = write_ade(tmp_path / "ade", val_sizes=[(70, 101), (70, 101)], image_ext=".png")
    recipe = dict(SEGMENTATION_RECIPE.defaults(), scale=[101, 70])  # no resizing, so the oracle is exact at every pixel
    dataset = SegmentationDataset(ade20k_pairs(str(root), "val"), EvalTransform(recipe), LabelMapping(3, True))
    metrics = evaluate_segmentation(
        ColourOracle(),
        dataset,
        ["background", "red", "blue"],
        ProcessContext(),
        mode=mode,
        crop=(48, 64),
        stride=(32, 40),
    )
    assert metrics["mIoU"] == metrics["aAcc"] == 100.0
    assert metrics["images"] == 2


# ---------------------------------------------------------------- data


def test_transforms_keep_classes_crop_pad_and_resize():
    recipe = dict(SEGMENTATION_RECIPE.defaults(), scale=[160, 80], crop_size=[72, 100])
    rng = np.random.default_rng(0)
    classes, unlabelled = draw(67, 118, rng)
    labels = np.where(unlabelled, IGNORE_INDEX, classes)
    image = Image.fromarray(COLOURS[classes])
    transform = TrainTransform(recipe)
    torch.manual_seed(3)
    out_image, out_labels = transform(image, labels)
    assert out_image.shape == (3, 72, 100)
    assert out_labels.shape == (72, 100)
    assert out_labels.dtype == torch.int64
    assert set(out_labels.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}  # nearest neighbour: no new values
    small = TrainTransform(dict(recipe, scale=[40, 20], ratio_range=[1.0, 1.0]))  # image smaller than the crop
    padded_image, padded_labels = small(image, labels)
    assert (padded_labels[-10:] == IGNORE_INDEX).all()
    assert (padded_image[:, -10:] == 0).all()
    assert rescale_size(512, 683, [2048, 512]) == (512, 683)
    assert rescale_size(100, 1000, [2048, 512]) == (205, 2048)
    assert EvalTransform(SEGMENTATION_RECIPE.defaults()).image_tensor(image).shape == (
        3,
        512,
        902,
    )  # 118 * 512 / 67 = 901.7


def test_label_mapping_ade20k_and_plain():
    ade = LabelMapping(3, reduce_zero_label=True)
    assert ade(np.array([0, 1, 3, 255]), "m.png").tolist() == [IGNORE_INDEX, 0, 2, IGNORE_INDEX]
    plain = LabelMapping(3, reduce_zero_label=False)
    assert plain(np.array([0, 2, 255]), "m.png").tolist() == [0, 2, IGNORE_INDEX]
    with pytest.raises(Exception, match=r"m.png: mask values 3, 7 are not classes.*0..2"):
        plain(np.array([0, 3, 7]), "m.png")


def test_loss_of_a_batch_without_labelled_pixels_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, 7, requires_grad=True)
    loss = seg.segmentation_loss(logits, torch.full((2, 5, 7), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all()
    labels = torch.randint(0, 3, (2, 5, 7))
    torch.testing.assert_close(seg.segmentation_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))


# ---------------------------------------------------------------- end to end


def test_train_eval_and_predict_on_the_ade20k_layout(tmp_path, capsys):
    data = write_ade(tmp_path / "ade")
    out = tmp_path / "runs"
    assert (
        main(
            [
                "seg-train",
                "--model",
                "hafa_pvt_v2_b0",
                "--baseline",
                "--data",
                str(data),
                "--num-classes",
                "3",
                "--iterations",
                "2",
                "--output",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "hafa_pvt_v2_b0 vs pvt_v2_b0" in printed
    assert "points mIoU" in printed
    for name in ("hafa_pvt_v2_b0", "pvt_v2_b0"):
        run = out / name
        assert (run / "best.pth").exists()
        assert (run / "last.pth").exists()
        assert (run / "curves.png").exists()
    best = out / "hafa_pvt_v2_b0" / "best.pth"
    saved = torch.load(best, weights_only=True)
    assert saved["task"] == "segmentation"
    assert saved["classes"] == ["class_0", "class_1", "class_2"]
    assert main(["seg-eval", "--checkpoint", str(best), "--workers", "0", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mIoU"] == pytest.approx(saved["metrics"]["mIoU"])
    assert metrics["images"] == 2
    assert "| class_2 |" in capsys.readouterr().out
    assert main(["seg-eval", "--checkpoint", str(best), "--workers", "0", "--eval-mode", "slide"]) == 0
    result = seg.predict_segmentation(
        str(best), str(data / "images" / "validation" / "img_0.jpg"), str(tmp_path / "overlay.png")
    )
    overlay = Image.open(tmp_path / "overlay.png")
    assert overlay.height >= 70
    assert overlay.width > 101
    assert result["labels"].shape == (70, 101)
    assert sum(result["class_shares"].values()) == pytest.approx(100.0)
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(best),
                "--image",
                str(data / "images" / "validation" / "img_0.jpg"),
                "--output",
                str(tmp_path / "cli.png"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("segmentation: ")
    assert (tmp_path / "cli.png").exists()


def test_folder_layout_with_unpaired_corrupt_and_empty_masks(tmp_path, caplog):
    data = write_folders(tmp_path / "data")
    (data / "images" / "train" / "no_mask.png").write_bytes((data / "images" / "train" / "0.png").read_bytes())
    (data / "masks" / "train" / "no_image.png").write_bytes((data / "masks" / "train" / "0.png").read_bytes())
    Image.new("L", (101, 70), 255).save(data / "masks" / "train" / "0.png")  # every pixel ignored: fine
    (data / "masks" / "train" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "runs"
    assert (
        main(
            ["seg-train", "--model", "pvt_v2_b0", *folder_args(data), "--iterations", "2", "--output", str(out), *QUICK]
        )
        == 0
    )
    no_mask = f"{data}/images/train: leaving out 1 file with no mask of the same name (no_mask.png)"
    assert caplog.text.count(no_mask) == 1  # once, though the check and the dataset both pair the folders
    assert f"{data}/masks/train: leaving out 1 file with no image of the same name (no_image.png)" in caplog.text
    assert "skipping unreadable mask" in caplog.text
    assert "1.png" in caplog.text

    rows = list(csv.DictReader((out / "pvt_v2_b0" / "log.csv").read_text().splitlines()))
    assert int(rows[-1]["skipped_images"]) >= 1


@pytest.mark.parametrize("workers", ["0", "1"])
def test_out_of_range_class_ids_are_an_error_naming_the_file(tmp_path, capsys, workers):
    data = write_folders(tmp_path / "data")
    Image.fromarray(np.full((70, 101), 7, np.uint8)).save(data / "masks" / "train" / "0.png")
    assert (
        main(
            [
                "seg-train",
                "--model",
                "pvt_v2_b0",
                *folder_args(data),
                "--iterations",
                "2",
                "--output",
                str(tmp_path / "r"),
                *QUICK,
                "--workers",
                workers,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "0.png: mask values 7 are not classes" in err
    assert "--num-classes" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("break_data", "message"),
    [
        (lambda d: Image.new("RGB", (101, 70)).save(d / "masks" / "train" / "0.png"), "not a RGB image"),
        (lambda d: Image.new("L", (50, 50)).save(d / "masks" / "train" / "0.png"), "is 50x50 but its image"),
        (
            lambda d: [mask.unlink() for mask in (d / "masks" / "val").iterdir()],
            "no image in .* has a mask of the same name",
        ),
        (lambda d: shutil.rmtree(d / "masks" / "val"), "mask folder not found"),
    ],
)
def test_bad_masks_get_a_clear_message(tmp_path, capsys, break_data, message):
    data = write_folders(tmp_path / "data")
    break_data(data)
    assert (
        main(
            [
                "seg-train",
                "--model",
                "pvt_v2_b0",
                *folder_args(data),
                "--iterations",
                "2",
                "--output",
                str(tmp_path / "r"),
                *QUICK,
            ]
        )
        == 2
    )

    assert re.search(message, capsys.readouterr().err)


def test_data_option_mistakes(tmp_path, capsys):
    data = write_folders(tmp_path / "data")
    common = ["--output", str(tmp_path / "r"), *QUICK]
    assert main(["seg-train", "--model", "pvt_v2_b0", *folder_args(data)[:-2], *common]) == 2
    assert "--num-classes" in capsys.readouterr().err
    assert main(["seg-train", "--model", "pvt_v2_b0", "--images", str(data), "--data", str(data), *common]) == 2
    assert "either --data ROOT" in capsys.readouterr().err
    assert main(["seg-train", "--model", "pvt_v2_b0", "--data", str(data), *common]) == 2
    assert "not in the ADE20K layout" in capsys.readouterr().err
    assert main(["seg-train", "--data", str(data), *common]) == 2
    assert "choose the model(s) with --model" in capsys.readouterr().err
    assert main(["seg-eval", "--checkpoint", str(data / "images" / "train" / "0.png")]) == 2
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err


def test_recipe_file_gives_the_papers_settings():
    recipe = load_recipe("ade20k_semantic_fpn", SEGMENTATION_RECIPE)
    assert recipe == SEGMENTATION_RECIPE.defaults()  # the defaults are the paper's recipe
    assert (recipe["lr"], recipe["weight_decay"], recipe["poly_power"], recipe["iterations"]) == (
        1e-4,
        1e-4,
        0.9,
        40000,
    )
    model = semantic_fpn("hafa_pvt_v2_b0", num_classes=150)

    optimizer = build_optimizer(model, recipe, global_batch=16)
    assert type(optimizer).__name__ == "AdamW"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    scheduler = seg.TASK.scheduler(optimizer, recipe, updates_per_epoch=100, epochs=10)
    scheduler.step_update(num_updates=500)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5**0.9)
    scheduler.step_update(num_updates=1000)
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert load_recipe("scenes_semantic_fpn", SEGMENTATION_RECIPE)["crop_size"] == [128, 128]


def test_backbone_from_an_imagenet_checkpoint(tmp_path, capsys):

    data = write_ade(tmp_path / "ade")
    checkpoint = tmp_path / "pvt_v2_b0_imagenet.pth"
    torch.save(timm.create_model("pvt_v2_b0").state_dict(), checkpoint)
    assert (
        main(
            [
                "seg-train",
                "--model",
                "hafa_pvt_v2_b0",
                "--data",
                str(data),
                "--num-classes",
                "3",
                "--iterations",
                "2",
                "--backbone-checkpoint",
                str(checkpoint),
                "--output",
                str(tmp_path / "r"),
                *QUICK,
            ]
        )
        == 0
    )
    assert "copied" in capsys.readouterr().out


def _train_command(data, out):
    return [
        sys.executable,
        "-m",
        "hafa",
        "seg-train",
        "--model",
        "pvt_v2_b0",
        "--data",
        str(data),
        "--num-classes",
        "3",
        "--iterations",
        "4",
        "--output",
        str(out),
        *QUICK,
    ]


def test_resume_after_sigterm_is_exact(tmp_path):
    data = write_ade(tmp_path / "ade")
    reference = subprocess.run(_train_command(data, tmp_path / "ref"), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]
    process = subprocess.Popen(_train_command(data, tmp_path / "cut"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = tmp_path / "cut" / "pvt_v2_b0" / "last.pth"
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # during epoch 2 of 2
    process.communicate(timeout=120)
    assert process.returncode == 130, "the run should stop on the signal and save"
    resumed = subprocess.run(_train_command(data, tmp_path / "cut") + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(tmp_path / "ref" / "pvt_v2_b0" / "last.pth", weights_only=True)["state_dict"]
    got = torch.load(last, weights_only=True)["state_dict"]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    data = write_ade(tmp_path / "ade", val_sizes=SIZES[:3])  # 3 images: the processes get 2 and 1
    assert (
        main(
            [
                "seg-train",
                "--model",
                "hafa_pvt_v2_b0",
                "--data",
                str(data),
                "--num-classes",
                "3",
                "--iterations",
                "2",
                "--output",
                str(tmp_path / "r"),
                *QUICK,
            ]
        )
        == 0
    )
    evaluate = [
        "-m",
        "hafa",
        "seg-eval",
        "--checkpoint",
        str(tmp_path / "r" / "hafa_pvt_v2_b0" / "best.pth"),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--json",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *evaluate,
            str(tmp_path / "two.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, *evaluate, str(tmp_path / "one.json")], capture_output=True, text=True, env=env
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two_metrics, one_metrics = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two_metrics["images"] == one_metrics["images"] == 3
    for key in ("mIoU", "mAcc", "aAcc"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], abs=1e-9)


def test_compiled_seg_train_evaluates_images_of_two_sizes_as_its_checkpoint_does(tmp_path, caplog):
    data = write_ade(tmp_path / "ade")  # validation images of 70 x 101 and 90 x 75: two whole-image graphs
    out = tmp_path / "runs"
    argv = ["seg-train", "--model", "hafa_pvt_v2_b0", "--data", str(data), "--num-classes", "3"]
    with caplog.at_level(logging.INFO, logger="hafa"):
        assert main([*argv, "--iterations", "2", "--output", str(out), "--compile", "aot_eager", *QUICK]) == 0
    compiling = [r.message for r in caplog.records if "compiling for input" in r.message]
    assert len(compiling) == 3, compiling  # the training crops, then each validation size
    assert "(training; graph 1 of at most 16)" in compiling[0]
    best = out / "hafa_pvt_v2_b0" / "best.pth"
    saved = torch.load(best, weights_only=True)
    for extra in ([], ["--compile", "aot_eager", "--eval-mode", "slide"]):
        metrics_file = tmp_path / f"m{len(extra)}.json"
        assert main(["seg-eval", "--checkpoint", str(best), "--workers", "0", "--json", str(metrics_file), *extra]) == 0
        if not extra:  # eager, on the weights the compiled run saved
            assert json.loads(metrics_file.read_text())["mIoU"] == pytest.approx(saved["metrics"]["mIoU"], abs=1e-6)
