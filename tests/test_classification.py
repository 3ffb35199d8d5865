import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hafa.checkpoint import read_checkpoint_or_state_dict
from hafa.cli import main
from hafa.compiled import SizedCompile
from hafa.errors import UserError
from hafa.tasks import classification as cls
from hafa.tasks.job import build_optimizer
from hafa.tasks.run_settings import CLASSIFICATION_RECIPE, load_recipe, override_recipe
from hafa.tasks.training import StopRequested

QUICK = [
    "--recipe",
    "mnist_demo",
    "--img-size",
    "32",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--set",
    "warmup_epochs=0",
]


def write_dataset(root, classes=("circle", "square", "stripe"), per_class=(8, 4), size=40, mode="RGB"):
    """A tiny real-format dataset: a few drawn shapes per class, PNG files in ROOT/{train,val}/<class>/."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                image = np.full((size, size, 3), 30, np.uint8) + rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
                y, x = np.mgrid[:size, :size]
                if c == 0:
                    image[(y - size / 2) ** 2 + (x - size / 2) ** 2 < (size / 3) ** 2] = (220, 60, 60)
                elif c == 1:
                    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (60, 220, 60)
                else:
                    image[(x // 5) % 2 == 0] = (60, 60, 220)
                Image.fromarray(image).convert(mode).save(root / split / name / f"{i}.png")
    return root


def read_log(run_dir):
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def test_train_then_eval_reproduces_the_accuracy(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "runs"
    assert (
        main(
            [
                "train",
                "--model",
                "hafa_pvt_v2_b0",
                "--baseline",
                "--data",
                str(data),
                "--epochs",
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
    for name in ("hafa_pvt_v2_b0", "pvt_v2_b0"):
        run = out / name
        rows = read_log(run)
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        assert (run / "best.pth").exists()
        assert (run / "last.pth").exists()
        assert (run / "curves.png").exists()
        assert any(f.startswith("events") for f in os.listdir(run / "tensorboard"))
    best = torch.load(out / "hafa_pvt_v2_b0" / "best.pth", weights_only=True)
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "hafa_pvt_v2_b0" / "best.pth"),
                "--workers",
                "0",
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["top1"] == pytest.approx(best["metrics"]["top1"])
    assert metrics["images"] == 12
    png = tmp_path / "prediction.png"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(out / "hafa_pvt_v2_b0" / "best.pth"),
                "--image",
                str(data / "val" / "square" / "0.png"),
                "--output",
                str(png),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "classification: square" in printed
    assert Image.open(png).size == (400, 460)


def test_set_reads_numbers_as_numbers_and_refuses_unknown_keys():
    defaults = CLASSIFICATION_RECIPE.defaults()
    recipe = override_recipe(defaults, {}, ["lr=1e-3", "epochs=5", "auto_augment=None"], CLASSIFICATION_RECIPE)
    assert (recipe["lr"], recipe["epochs"], recipe["auto_augment"]) == (1e-3, 5, None)
    with pytest.raises(UserError, match="--set lr must be a number > 0"):
        override_recipe(defaults, {}, ["lr=fast"], CLASSIFICATION_RECIPE)
    with pytest.raises(UserError, match="KEY one of auto_augment"):
        override_recipe(defaults, {}, ["learning_rate=1"], CLASSIFICATION_RECIPE)


def test_grayscale_rgba_and_corrupt_images(tmp_path, caplog):
    data = write_dataset(tmp_path / "data", mode="L")
    write_dataset(tmp_path / "rgba", mode="RGBA")
    for split in ("train", "val"):
        for name in ("circle", "square", "stripe"):
            for f in os.listdir(tmp_path / "rgba" / split / name):
                os.replace(tmp_path / "rgba" / split / name / f, data / split / name / f"rgba_{f}")
    (data / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "val" / "square" / "broken.jpg").write_bytes(b"\xff\xd8\xff nothing")
    out = tmp_path / "runs"
    assert (
        main(["train", "--model", "pvt_v2_b0", "--data", str(data), "--epochs", "1", "--output", str(out), *QUICK]) == 0
    )
    assert "broken.png" in caplog.text
    rows = read_log(out / "pvt_v2_b0")
    assert int(rows[0]["skipped_images"]) >= 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "data directory not found"),
        (lambda root: os.makedirs(root / "train"), "no class folders"),
        (lambda root: (write_dataset(root), os.makedirs(root / "train" / "empty")), "without images in .*: empty"),
        (
            lambda root: (write_dataset(root), os.rename(root / "val" / "stripe", root / "val" / "zebra")),
            "classes differ",
        ),
        (lambda root: (write_dataset(root), shutil.rmtree(root / "val")), "has no 'val' folder"),
    ],
)
def test_bad_data_gets_a_clear_message(tmp_path, capsys, make, message):
    root = tmp_path / "data"
    make(root)
    code = main(["train", "--model", "pvt_v2_b0", "--data", str(root), "--output", str(tmp_path / "r"), *QUICK])
    assert code == 2

    assert re.search(message, capsys.readouterr().err)


def test_unknown_model_and_other_user_errors(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    assert (
        main(["train", "--model", "hafa_pvt_v2_b00", "--data", str(data), "--output", str(tmp_path / "r"), *QUICK]) == 2
    )
    assert "did you mean hafa_pvt_v2_b0" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--model",
                "pvt_v2_b0",
                "--data",
                str(data),
                "--num-classes",
                "5",
                *QUICK,
                "--output",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "has 3 classes" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--model",
                "pvt_v2_b0",
                "--data",
                str(data),
                "--set",
                "mixup_alpha=1",
                *QUICK,
                "--output",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "expected KEY=VALUE" in capsys.readouterr().err
    bad_recipe = tmp_path / "r.yaml"
    bad_recipe.write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert (
        main(
            [
                "train",
                "--model",
                "pvt_v2_b0",
                "--data",
                str(data),
                *QUICK,
                "--recipe",
                str(bad_recipe),
                "--output",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "unknown settings: learning_rate" in capsys.readouterr().err


def test_existing_run_is_never_overwritten_and_nan_loss_stops_cleanly(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "runs"
    args = ["train", "--model", "pvt_v2_b0", "--data", str(data), "--epochs", "1", "--output", str(out), *QUICK]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(args[: -len(QUICK)] + QUICK + ["--resume", "--set", "smoothing=0.3"]) == 2
    assert "differ from the saved run" in capsys.readouterr().err
    nan_args = [
        "train",
        "--model",
        "pvt_v2_b0",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--output",
        str(tmp_path / "nan"),
        *QUICK,
        "--lr",
        "1e12",
    ]
    assert main(nan_args) == 2
    assert "the loss became" in capsys.readouterr().err


def test_init_from_a_baseline_checkpoint(tmp_path):
    data = write_dataset(tmp_path / "data")
    baseline = tmp_path / "pvt_v2_b0_imagenet.pth"
    torch.save(timm.create_model("pvt_v2_b0").state_dict(), baseline)  # 1000-class head: re-initialised
    assert (
        main(
            [
                "train",
                "--model",
                "hafa_pvt_v2_b0",
                "--data",
                str(data),
                "--epochs",
                "1",
                "--init-from",
                str(baseline),
                "--output",
                str(tmp_path / "r"),
                *QUICK,
            ]
        )
        == 0
    )


def test_recipe_file_gives_the_papers_settings():
    recipe = load_recipe("imagenet_hafa", CLASSIFICATION_RECIPE)
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=10)
    optimizer = build_optimizer(model, recipe, global_batch=256)
    assert type(optimizer).__name__ == "AdamW"
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.999)
    assert group["lr"] == pytest.approx(2e-3)
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.0, 0.05}
    scheduler = cls.TASK.scheduler(optimizer, recipe, updates_per_epoch=100, epochs=recipe["epochs"])
    assert type(scheduler).__name__ == "CosineLRScheduler"
    assert scheduler.warmup_t == 500
    assert scheduler.t_initial == 30000
    mixup = cls.build_mixup(recipe, 10)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert type(cls.build_criterion(recipe, mixup)).__name__ == "SoftTargetCrossEntropy"
    transform = repr(cls.train_transform(recipe))
    assert "RandAugment" in transform
    assert "RandomErasing(p=0.25" in transform
    assert recipe["epochs"] == 300
    assert recipe["drop_path"] == 0.1
    assert "CenterCrop(size=(224, 224))" in repr(cls.eval_transform(recipe))


def _final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)["state_dict"]


def _train_command(data, out, epochs):
    return [
        sys.executable,
        "-m",
        "hafa",
        "train",
        "--model",
        "hafa_pvt_v2_b0",
        "--data",
        str(data),
        "--epochs",
        str(epochs),
        "--output",
        str(out),
        *QUICK,
        "--drop-path",
        "0.1",
    ]


# SIGTERM's resume is also tested in the default suite by test_segmentation's resume after SIGTERM
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL])
def test_resume_after_a_kill_is_exact(tmp_path, sig):
    data = write_dataset(tmp_path / "data", per_class=(12, 2))
    reference = subprocess.run(_train_command(data, tmp_path / "ref", 3), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    process = subprocess.Popen(
        _train_command(data, tmp_path / "cut", 3), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    last = tmp_path / "cut" / "hafa_pvt_v2_b0" / "last.pth"
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    process.send_signal(sig)
    process.communicate(timeout=120)
    assert process.returncode != 0, "the run finished before the signal arrived"
    resumed = subprocess.run(_train_command(data, tmp_path / "cut", 3) + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = (
        _final_weights(tmp_path / "ref" / "hafa_pvt_v2_b0"),
        _final_weights(tmp_path / "cut" / "hafa_pvt_v2_b0"),
    )
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    rows = read_log(tmp_path / "cut" / "hafa_pvt_v2_b0")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    reference_rows = read_log(tmp_path / "ref" / "hafa_pvt_v2_b0")
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in reference_rows]  # also the cut epoch's


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from hafa.tasks.classification import TASK
    from hafa.tasks.job import train_model
    from hafa.tasks.processes import close_processes, init_processes
    from hafa.tasks.run_settings import CLASSIFICATION_RECIPE, ClassificationSettings, load_recipe
    data, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    processes = init_processes("cpu")
    recipe = load_recipe("mnist_demo", CLASSIFICATION_RECIPE)
    recipe.update(img_size=32, batch_size=batch, epochs=2, warmup_epochs=0)
    # LAA's BatchNorm normalises over each process's own batch on CPU (torch has no SyncBatchNorm there):
    # with the baseline's norm one process and two compute the same steps
    settings = ClassificationSettings(
        model="hafa_pvt_v2_b0", data=data, recipe=recipe, run_dir=out, workers=0, hafa_options=dict(laa_norm="baseline")
    )
    result = train_model(TASK, settings, processes)
    torch.save(result["network"].state_dict(), f"{out}/rank{processes.rank}.pth")
    close_processes()
""")


def test_two_processes_with_gloo_match_one_process(tmp_path):
    data = write_dataset(tmp_path / "data", per_class=(8, 2))
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(data),
            str(tmp_path / "two"),
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(script), str(data), str(tmp_path / "one"), "8"], capture_output=True, text=True, env=env
    )
    assert one.returncode == 0, one.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "two" / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pth", weights_only=True)
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
        # float sums in another order; Adam magnifies them where gradients are near zero (LAA's offsets
        # start at zero): 2e-5 there, 6e-6 elsewhere, against a step of lr = 1e-3 (a wrong split is a whole step)
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=5e-5, msg=name)
    assert (tmp_path / "two" / "log.csv").exists()
    assert not (tmp_path / "two" / "rank1").exists()


def test_one_torchrun_process_joins_a_process_group(tmp_path):
    data = write_dataset(tmp_path / "data", per_class=(8, 2))

    def argv(output):  # LAA's BatchNorm would leave its conv bias a gradient of rounding noise, which Adam magnifies
        base = ["train", "--model", "hafa_pvt_v2_b0", "--data", str(data), "--output", str(output), *QUICK]
        return [*base, "--epochs", "1", "--laa-norm", "baseline"]

    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "hafa"]
        + argv(tmp_path / "torchrun"),
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(argv(tmp_path / "plain")) == 0
    # DistributedDataParallel over one process takes the same steps as no process group
    weights = {
        how: torch.load(tmp_path / how / "hafa_pvt_v2_b0" / "last.pth", weights_only=True)["state_dict"]
        for how in ("torchrun", "plain")
    }
    for name, tensor in weights["plain"].items():
        torch.testing.assert_close(weights["torchrun"][name], tensor, rtol=1e-4, atol=5e-5, msg=name)


def _train_losses(data, out, extra):
    argv = ["train", "--model", "hafa_pvt_v2_b0", "--data", str(data), "--output", str(out), *QUICK, "--epochs", "1"]
    assert main([*argv, *extra]) == 0
    return [float(row["train_loss"]) for row in read_log(out / "hafa_pvt_v2_b0")]


def test_compiled_training_gives_eager_losses_and_plain_checkpoints(tmp_path, caplog, capsys):
    data = write_dataset(tmp_path / "data")
    eager = _train_losses(data, tmp_path / "eager", [])
    compiled = _train_losses(data, tmp_path / "compiled", ["--compile", "aot_eager"])
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert "torch.compile (aot_eager) and the first step took" in caplog.text
    best = tmp_path / "compiled" / "hafa_pvt_v2_b0" / "best.pth"
    assert not [k for k in torch.load(best, weights_only=True)["state_dict"] if "_orig_mod" in k]
    metrics = tmp_path / "m.json"
    assert (
        main(["eval", "--checkpoint", str(best), "--workers", "0", "--compile", "aot_eager", "--json", str(metrics)])
        == 0
    )
    assert json.loads(metrics.read_text())["top1"] == pytest.approx(
        torch.load(best, weights_only=True)["metrics"]["top1"]
    )


@pytest.mark.slow
def test_inductor_compiled_training_gives_eager_losses(tmp_path):
    data = write_dataset(tmp_path / "data")
    eager = _train_losses(data, tmp_path / "eager", [])
    assert _train_losses(data, tmp_path / "compiled", ["--compile"]) == pytest.approx(eager, rel=1e-3)


def _stop_at_compiled_call(monkeypatch, number: int) -> None:
    """The compiled network's call `number` is stopped as a signal arriving while it compiles stops it."""
    original, calls = SizedCompile.__call__, []

    def call(self, *args, **kwargs):
        calls.append(self.module.training)
        if len(calls) == number:
            raise StopRequested
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SizedCompile, "__call__", call)


@pytest.mark.parametrize(
    ("stopped_call", "during"),
    [pytest.param(3, "the third step", marks=pytest.mark.slow), (7, "the first evaluation")],  # the same path
)
def test_a_stop_while_compiling_saves_the_state_before_it_and_resumes_exactly(
    tmp_path, monkeypatch, stopped_call, during
):
    data = write_dataset(tmp_path / "data", per_class=(8, 2))  # 6 steps an epoch, then one evaluation batch
    argv = ["train", "--model", "hafa_pvt_v2_b0", "--data", str(data), *QUICK, "--epochs", "2"]
    argv += ["--compile", "aot_eager", "--drop-path", "0.1"]
    assert main([*argv, "--output", str(tmp_path / "ref")]) == 0
    with monkeypatch.context() as patch:
        _stop_at_compiled_call(patch, stopped_call)
        assert main([*argv, "--output", str(tmp_path / "cut")]) == 130, during
    saved = torch.load(tmp_path / "cut" / "hafa_pvt_v2_b0" / "last.pth", weights_only=True)["train_state"]
    assert (saved["epoch"], saved["step_in_epoch"]) == ((0, 2) if stopped_call == 3 else (0, 6))
    assert main([*argv, "--output", str(tmp_path / "cut"), "--resume"]) == 0
    expected, got = (
        _final_weights(tmp_path / "ref" / "hafa_pvt_v2_b0"),
        _final_weights(tmp_path / "cut" / "hafa_pvt_v2_b0"),
    )
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    rows, reference_rows = read_log(tmp_path / "cut" / "hafa_pvt_v2_b0"), read_log(tmp_path / "ref" / "hafa_pvt_v2_b0")
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in reference_rows]


def test_sigterm_while_compiling_stops_the_run_within_seconds(tmp_path):
    data = write_dataset(tmp_path / "data", per_class=(8, 2))
    command = _train_command(data, tmp_path / "runs", 1)[:-2] + ["--compile"]  # inductor: a compile of minutes here
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "compiling for input" in line:
            break
    time.sleep(1)
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert time.time() - signalled < 30
    assert process.returncode not in (0, None)
    assert "SIGTERM received while compiling: stopping now" in err
    assert "before any step had finished; no epoch had finished, so nothing was saved" in err
    assert not (tmp_path / "runs" / "hafa_pvt_v2_b0" / "last.pth").exists()


def test_compiled_eval_at_another_resolution_than_training_gives_eager_numbers(tmp_path):
    data = write_dataset(tmp_path / "data", per_class=(4, 2))
    _train_losses(data, tmp_path / "runs", [])  # trained at 32 x 32
    best = str(tmp_path / "runs" / "hafa_pvt_v2_b0" / "best.pth")
    results = []
    for extra in ([], ["--compile", "aot_eager"]):
        path = tmp_path / f"m{len(extra)}.json"
        assert (
            main(["eval", "--checkpoint", best, "--workers", "0", "--img-size", "48", "--json", str(path), *extra]) == 0
        )
        results.append(json.loads(path.read_text()))
    assert results[1]["top1"] == results[0]["top1"]
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)


def test_a_run_from_weights_logs_them_as_epoch_0_beside_the_source_model(tmp_path, capsys, caplog):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "runs"
    assert (
        main(["train", "--model", "pvt_v2_b0", "--data", str(data), "--epochs", "1", "--output", str(out), *QUICK]) == 0
    )
    source = out / "pvt_v2_b0" / "best.pth"
    assert main(["eval", "--checkpoint", str(source), "--workers", "0", "--json", str(tmp_path / "m.json")]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    capsys.readouterr()
    again = tmp_path / "again"
    command = ["train", "--model", "pvt_v2_b0", "hafa_pvt_v2_b0", "--data", str(data), "--epochs", "1"]
    with caplog.at_level(logging.INFO, logger="hafa"):
        assert main([*command, "--init-from", str(source), "--output", str(again), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "| model | before training top-1 (%) | best val top-1 (%) |" in printed
    for name in ("pvt_v2_b0", "hafa_pvt_v2_b0"):
        rows = read_log(again / name)
        assert [int(r["epoch"]) for r in rows] == [0, 1]
        assert rows[0]["train_loss"] == ""
        result = json.loads((again / name / "result.json").read_text())
        assert result["source_metrics"]["top1"] == pytest.approx(evaluated["top1"])
        assert float(rows[0]["val_top1"]) == pytest.approx(result["start_metrics"]["top1"], abs=1e-4)
    # the same network with the same weights: epoch 0 is the separate evaluation
    same = json.loads((again / "pvt_v2_b0" / "result.json").read_text())["start_metrics"]
    assert same["top1"] == pytest.approx(evaluated["top1"])
    assert same["loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
    # a run from scratch has no epoch 0
    assert [int(r["epoch"]) for r in read_log(out / "pvt_v2_b0")] == [1]
    # from a baseline's weights LAA starts in baseline mode; --laa-norm still chooses
    assert (
        read_checkpoint_or_state_dict(str(again / "hafa_pvt_v2_b0" / "best.pth")).model_args["laa_norm"] == "baseline"
    )
    assert "hafa_pvt_v2_b0: LAA in 'baseline' mode, as the weights it starts from" in caplog.text
    # resuming it keeps that mode (--resume compares the saved HAFA options)
    hafa_only = ["train", "--model", "hafa_pvt_v2_b0", "--data", str(data), "--init-from", str(source)]
    assert main([*hafa_only, "--epochs", "2", "--output", str(again), "--resume", *QUICK]) == 0
    assert [int(r["epoch"]) for r in read_log(again / "hafa_pvt_v2_b0")] == [0, 1, 2]
