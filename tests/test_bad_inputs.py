"""Bad or awkward inputs to the task commands: each gets its one-line refusal before any work starts,
or the right result; none a raw traceback, a lost epoch or a silently wrong number."""

import json
import os
import signal
import time

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hafa import HafaOptions
from hafa.checkpoint import read_file, write_file
from hafa.cli import main
from hafa.errors import UserError, message_of
from hafa.models import freeze_batch_norm_statistics
from hafa.models.semantic_fpn import SemanticFPN
from hafa.progress import format_rate
from hafa.tasks.drawing import DRAW_LONG_SIDE, shrink_to_draw
from hafa.tasks.networks import create_network, segmenter_arguments
from hafa.tasks.processes import ProcessContext
from hafa.tasks.run_log import RunLog, format_metric, format_metrics
from hafa.tasks.training import StopOnSignal
from test_classification import QUICK, read_log, write_dataset

MISSING = "/nonexistent/data"  # an option error must come before the data is looked at


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed
    error = printed.strip().splitlines()[-1]  # after the progress bars
    assert error.startswith(f"hafa {argv[0]}: error: ")
    return error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "0"], "--epochs must be a whole number >= 1, not 0"),
        (["train", "--batch-size", "-2"], "--batch-size must be a whole number >= 1 (per process), not -2"),
        (["train", "--lr", "0"], "--lr must be a number > 0"),
        (["train", "--lr", "nan"], "--lr must be a number > 0"),
        (["train", "--workers", "-1"], "--workers must be a whole number >= 0 (0: load in the main process), not -1"),
        (["train", "--img-size", "16"], "--img-size must be a whole number from 32 to 4096 (the models end at stride"),
        (["train", "--device", "gpu"], "--device must be cpu, cuda or cuda:N, not 'gpu'"),
        (
            ["train", "--clip-grad", "-1"],
            "--clip-grad must be a number > 0 (the largest gradient norm), or none, not -1",
        ),
        (["train", "--drop-path", "2"], "--drop-path must be a number >= 0 and < 1, not 2"),
        (["train", "--set", "epochs=2.5"], "--set epochs must be a whole number >= 1, not 2.5"),
        (["train", "--set", "mixup=lots"], "--set mixup must be a number >= 0, not 'lots'"),
        (["train", "--set", "hflip=[1,2]"], "--set hflip must be a number from 0 to 1, not [1, 2]"),
        (["train", "--set", "smoothing=-1"], "--set smoothing must be a number >= 0 and < 1, not -1"),
        (["train", "--set", "mixup=0", "--set", "mixup=inf"], "--set mixup must be a number >= 0, not 'inf'"),
        (
            ["train", "--set", "warmup_epochs=9", "--epochs", "3"],
            "the warm-up cannot be longer than the run: shorten it with --warmup-epochs (or run longer with --epochs)",
        ),
        (["train", "--epochs", "1"], "warmup_epochs 5.0, epochs 1: the warm-up cannot be longer than the run: shorten"),
        (["seg-train", "--crop-size", "16", "64"], "--crop-size must be a list of 2 whole numbers from 32 to 4096"),
        (["seg-train", "--iterations", "0"], "--iterations must be a whole number >= 1"),
        (["seg-train", "--set", "eval_mode=3"], "--set eval_mode must be one of whole, slide, not '3'"),
        (["seg-train", "--set", "eval_crop=[0,0]"], "--set eval_crop must be a list of 2 whole numbers from 32"),
        (["seg-train", "--set", "scale=[0,0]"], "--set scale must be a list of 2 whole numbers from 32"),
        (["seg-train", "--set", "eval_stride=[0,0]"], "--set eval_stride must be a list of 2 whole numbers >= 1"),
        (["seg-train", "--set", "eval_stride=[600,600]"], "each side of eval_stride at most eval_crop's"),
        (["det-train", "--min-size", "8"], "--min-size must be a whole number from 32 to 4096"),
        (["det-train", "--min-size", "64", "--max-size", "32"], "min_size 64, max_size 32: min_size must be at most"),
        (["det-train", "--warmup-iters", "-1"], "--warmup-iters must be a whole number >= 0, not -1"),
        (["det-train", "--set", "filter_empty=maybe"], "--set filter_empty must be true or false, not 'maybe'"),
        (["eval", "--batch-size", "0", "--checkpoint", "x.pth"], "--batch-size must be a whole number >= 1"),
        (["eval", "--img-size", "8", "--checkpoint", MISSING], "--img-size must be a whole number from 32"),
        (["predict", "--score-threshold", "5", "--checkpoint", MISSING], "--score-threshold must be a number from"),
        (["predict", "--score-threshold", "nan", "--checkpoint", MISSING], "--score-threshold must be a number"),
        (["visualize", "--scale", "1000"], "--scale must be a whole number from 1 to 16, not 1000"),
        (["visualize", "--scale", "16", "--img-size", "1024"], "at most 64 million pixels are drawn"),
        (["models", "--img-size", "0"], "--img-size must be a whole number from 32"),
        (["bench", "--threads", "-1"], "--threads must be a whole number >= 1, or none, not -1"),
        (["bench", "--reps", "0"], "--reps must be a whole number >= 1, not 0"),
        (["bench", "--kernels", "triton"], "--kernels triton chooses the kernels the --cost model counts"),
        (
            ["seg-train", "--set", "warmup_iterations=9", "--iterations", "3"],
            "the warm-up cannot be longer than the run: shorten it with --set warmup_iterations=N",
        ),
        (["export", "--check-batches", "0"], "--check-batches must be a list of at least 1 whole numbers >= 1"),
    ],
)
def test_options_are_checked_before_any_work(tmp_path, capsys, argv, message):
    training = argv[0].endswith("train")
    extra = ["--data", MISSING, "--model", "pvt_v2_b0", "--output", str(tmp_path)] if training else []
    error = one_line_error([*argv, *extra], capsys)
    assert message in error
    assert not os.path.exists(tmp_path / "pvt_v2_b0")
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused(capsys):
    assert "CUDA is not available here" in one_line_error(["train", "--device", "cuda:1"], capsys)


def test_output_paths_are_checked_before_the_work_and_used_as_given(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    error = one_line_error(["train", "--data", MISSING, "--output", str(a_file / "runs")], capsys)
    assert "is a file, not a folder" in error
    error = one_line_error(["eval", "--checkpoint", MISSING, "--json", str(tmp_path)], capsys)
    assert f"--json {tmp_path} is a folder" in error
    error = one_line_error(["visualize", "--img-size", "32", "-o", str(a_file / "x.png")], capsys)
    assert "is a file, not a folder" in error
    picture = tmp_path / "picture_without_extension"
    assert main(["visualize", "--model", "hafa_pvt_v2_b0", "--img-size", "32", "-o", str(picture)]) == 0
    with Image.open(picture) as drawn:
        assert drawn.format == "PNG"


def test_extreme_images_are_drawn_and_segmented_at_a_bounded_size(tmp_path, capsys):
    strip = Image.new("RGB", (5000, 20), (200, 40, 40))
    shrunk, scale = shrink_to_draw(strip)
    assert shrunk.size == (DRAW_LONG_SIDE, 8)
    assert scale == pytest.approx(DRAW_LONG_SIDE / 5000)
    args = segmenter_arguments("pvt_v2_b0", num_classes=3, options=HafaOptions(), drop_path_rate=0.0, dropout=0.0)
    model: SemanticFPN = create_network("segmentation", "pvt_v2_b0", args).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 8, 300)).shape == (1, 3, 8, 300)  # padded up to what the backbone takes
    path = tmp_path / "strip.png"
    strip.save(path)
    start = time.perf_counter()
    assert main(["visualize", "--model", "hafa_pvt_v2_b0", "--image", str(path), "-o", str(tmp_path / "v.png")]) == 0
    assert time.perf_counter() - start < 60
    with Image.open(tmp_path / "v.png") as drawn:
        assert max(drawn.size) <= 3 * 1024 * 2


def test_the_first_ctrl_c_says_what_happens_and_the_second_aborts(caplog):
    with StopOnSignal() as stopper:
        os.kill(os.getpid(), signal.SIGINT)
        assert stopper.flag
        assert "stopping after this step and saving; press Ctrl-C again to abort without saving" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_nan_loss_names_only_a_checkpoint_that_exists(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    argv = ["train", "--model", "pvt_v2_b0", "--data", str(data), "--output", str(tmp_path / "r"), *QUICK]
    error = one_line_error([*argv, "--epochs", "1", "--lr", "1e12"], capsys)
    assert "the loss became nan" in error
    assert "no epoch had finished, so nothing was saved" in error
    assert "last.pth" not in error


def test_a_resume_whose_training_data_changed_is_refused_naming_the_difference(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    argv = ["train", "--model", "pvt_v2_b0", "--data", str(data), "--output", str(tmp_path / "r"), *QUICK]
    assert main([*argv, "--epochs", "1"]) == 0
    Image.new("RGB", (40, 40)).save(data / "train" / "circle" / "new.png")
    os.remove(data / "train" / "square" / "0.png")
    error = one_line_error([*argv, "--epochs", "2", "--resume"], capsys)
    assert "the training data changed since the run" in error
    assert "1 added (" in error
    assert "circle/new.png" in error
    assert "1 removed (" in error
    assert len(read_log(tmp_path / "r" / "pvt_v2_b0")) == 1


def test_with_baseline_a_problem_of_the_second_run_stops_before_the_first_trains(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    os.makedirs(tmp_path / "r" / "pvt_v2_b0")
    (tmp_path / "r" / "pvt_v2_b0" / "last.pth").write_bytes(b"")
    argv = ["train", "--model", "hafa_pvt_v2_b0", "--baseline", "--data", str(data), "--output", str(tmp_path / "r")]
    error = one_line_error([*argv, *QUICK], capsys)
    assert "pvt_v2_b0 already holds a run" in error
    assert not (tmp_path / "r" / "hafa_pvt_v2_b0").exists()
    error = one_line_error([*argv, "--stage-aggregation", "laa", "conv", "bogus", *QUICK], capsys)
    assert "--stage-aggregation must be a list of 3 values, each one of conv, laa, sia" in error


class RaisesInWorker(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise UserError(f"sample {index}: unreadable mask.png")


def test_an_error_in_a_dataloader_worker_reads_as_in_the_main_process():
    with pytest.raises(UserError) as caught:
        next(iter(DataLoader(RaisesInWorker(), num_workers=1)))
    assert "DataLoader worker" in str(caught.value)
    assert message_of(caught.value) == "sample 0: unreadable mask.png"
    assert message_of(UserError("plain")) == "plain"


def test_frozen_batchnorm_statistics_stay_and_its_weights_train():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    before = model[1].running_mean.clone()
    model.train()
    freeze_batch_norm_statistics(model)
    model(torch.randn(2, 3, 5, 5) + 3).sum().backward()
    assert torch.equal(model[1].running_mean, before)
    assert model[1].weight.grad is not None
    assert model[0].training
    freeze_batch_norm_statistics(torch.nn.Linear(2, 2))  # no BatchNorm: nothing to do


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--checkpoint", MISSING, "--json", "/proc/hafa-metrics.json"],
        ["export", "--model", "hafa_pvt_v2_b0", "-o", "/proc/hafa.onnx"],
        ["models", "--models", "hafa_pvt_v2_b0", "--json", "/proc/hafa-models.json"],
        ["train", "--data", MISSING, "--output", "/proc/hafa-runs"],
        ["visualize", "-o", "/proc/hafa.png"],
    ],
)
def test_outputs_are_proven_writable_before_the_work_even_for_root(argv, capsys):
    start = time.perf_counter()
    error = one_line_error(argv, capsys)
    assert "cannot write in /proc" in error
    assert time.perf_counter() - start < 10  # refused before any model is built


def test_models_json_into_a_folder_is_refused_before_the_work(tmp_path, capsys):
    error = one_line_error(["models", "--models", "hafa_pvt_v2_b0", "--json", str(tmp_path)], capsys)
    assert f"--json {tmp_path} is a folder; give a file name" in error


def test_a_resume_with_nothing_left_to_do_says_so_and_fails(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    argv = ["train", "--model", "pvt_v2_b0", "--data", str(data), "--output", str(tmp_path / "r"), *QUICK]
    assert main([*argv, "--epochs", "1"]) == 0
    error = one_line_error([*argv, "--epochs", "1", "--resume"], capsys)
    assert "has done 1 epochs; a run of 1 epochs has nothing left to do: raise --epochs to extend it" in error
    last = tmp_path / "r" / "pvt_v2_b0" / "last.pth"
    saved = read_file(str(last))
    saved["train_state"].update(epoch=1, step_in_epoch=2)  # as if stopped inside epoch 2
    write_file(str(last), saved)
    error = one_line_error([*argv, "--epochs", "1", "--resume"], capsys)
    assert "has done 1 epochs and 2 batches of epoch 2" in error


def test_progress_in_a_log_file_is_plain_lines(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("HAFA_LOG_INTERVAL", "0")
    data = write_dataset(tmp_path / "data")
    argv = ["train", "--model", "pvt_v2_b0", "--data", str(data), "--output", str(tmp_path / "r"), *QUICK]
    capsys.readouterr()
    assert main([*argv, "--epochs", "1"]) == 0
    printed = capsys.readouterr()
    log = printed.err + printed.out
    assert "\r" not in log
    assert "pvt_v2_b0 1/1: 3/6 batch (50%)" in log
    assert "eval: 3/3 batch (100%)" in log
    assert " img/s" in log
    epoch_line = next(line for line in caplog.text.splitlines() if "epoch 1/1: train loss" in line)
    assert "top1 " in epoch_line
    assert epoch_line.split("top1 ")[1].split()[0].endswith("%")


def test_an_unknown_option_names_the_command_and_what_it_takes(capsys):
    with pytest.raises(SystemExit):
        main(["seg-train", "--epochs", "1"])
    err = capsys.readouterr().err
    assert err.startswith("usage: hafa seg-train")
    assert "seg-train counts its length in --iterations" in err
    with pytest.raises(SystemExit):
        main(["train", "--batchsize", "4"])
    assert "--batchsize: did you mean --batch-size?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["det-train", "--iterations", "4"])
    assert "this command counts its length in --epochs" in capsys.readouterr().err


def test_speeds_and_metrics_have_one_unit_and_precision():
    assert [format_rate(v) for v in (0.4213, 12.34, 456.7)] == ["0.42", "12.3", "457"]
    assert format_metric("bbox_AP50", 77.44) == "77.4%"
    assert format_metric("top1", 98.5) == "98.50%"
    assert format_metric("loss", 0.071234) == "0.0712"
    assert format_metric("bbox_APl", float("nan")) == "n/a"  # COCO: no large object in the data
    assert format_metrics({"loss": 0.5, "mIoU": 40.0, "images": 3}) == "loss 0.5000  mIoU 40.00%"


@pytest.mark.parametrize(("keep", "kept"), [("best", {"best.pth"}), ("last", {"last.pth"})])
def test_keep_says_what_a_finished_run_keeps(tmp_path, capsys, keep, kept):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "r"
    argv = ["train", "--model", "pvt_v2_b0", "--data", str(data), "--output", str(out), *QUICK]
    assert main([*argv, "--epochs", "1", "--keep", keep]) == 0
    run = out / "pvt_v2_b0"
    assert {p.name for p in run.glob("*.pth")} == kept
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished"
    assert (result["best_checkpoint"] is None) == (keep == "last")
    assert "already holds a run" in one_line_error([*argv, "--epochs", "1"], capsys)
    if keep == "best":
        assert "the run kept only best.pth" in one_line_error([*argv, "--epochs", "2", "--resume"], capsys)


def test_curves_have_whole_epochs_and_a_caption(tmp_path, monkeypatch):
    shown = {}

    def keep_figure(figure, path, **kwargs):
        shown["ticks"] = list(figure.axes[0].get_xticks())
        shown["texts"] = [t.get_text() for t in figure.texts]

    monkeypatch.setattr(Figure, "savefig", keep_figure)
    log = RunLog(str(tmp_path), ProcessContext(), resume=False)
    for epoch in (1, 2, 3):
        log.epoch(dict(epoch=epoch, train_loss=1.0 / epoch, val_loss=0.5 / epoch))
    log.plot({"loss": ["train_loss", "val_loss"]}, note="train loss: with label smoothing")
    log.close()
    assert all(float(t).is_integer() for t in shown["ticks"])
    assert shown["texts"] == ["train loss: with label smoothing"]
