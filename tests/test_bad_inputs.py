"""Bad or awkward inputs to the task commands: each gets its one-line refusal before any work starts,
or the right result; none a raw traceback, a lost epoch or a silently wrong number."""

import os
import signal
import time

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hafa.cli import main
from hafa.errors import UserError, message_of
from hafa.models import freeze_batch_norm_statistics
from hafa.models.semantic_fpn import SemanticFPN
from hafa.tasks.networks import create_network, segmenter_arguments
from hafa.tasks.predict import DRAW_LONG_SIDE, shrink_to_draw
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
        (["train", "--epochs", "0"], "--epochs must be greater than 0, not 0"),
        (["train", "--batch-size", "-2"], "--batch-size must be greater than 0, not -2"),
        (["train", "--lr", "0"], "--lr must be greater than 0"),
        (["train", "--workers", "-1"], "--workers must be 0 (load in the main process) or more"),
        (["train", "--img-size", "16"], "--img-size 16 is too small: the models here take images of at least 32"),
        (["train", "--device", "gpu"], "--device takes cpu, cuda or cuda:N, not 'gpu'"),
        (["train", "--set", "epochs=2.5"], "--set epochs=2.5: expected a whole number, like the recipe's"),
        (["train", "--set", "mixup=lots"], "--set mixup=lots: expected a number"),
        (["train", "--set", "hflip=[1,2]"], "--set hflip=[1,2]: expected a number"),
        (["seg-train", "--crop-size", "16", "64"], "--crop-size 16 is too small"),
        (["seg-train", "--iterations", "0"], "--iterations must be greater than 0"),
        (["seg-train", "--set", "eval_mode=3"], "--set eval_mode=3: expected a text"),
        (["det-train", "--min-size", "8"], "--min-size 8 is too small"),
        (["det-train", "--set", "filter_empty=maybe"], "--set filter_empty=maybe: expected true or false"),
        (["eval", "--batch-size", "0", "--checkpoint", "x.pth"], "--batch-size must be greater than 0"),
        (["eval", "--img-size", "8", "--checkpoint", MISSING], "--img-size 8 is too small"),
    ],
)
def test_options_are_checked_before_any_work(tmp_path, capsys, argv, message):
    training = argv[0].endswith("train")
    extra = ["--data", MISSING, "--model", "pvt_v2_b0", "--output", str(tmp_path)] if training else []
    error = one_line_error([*argv, *extra], capsys)
    assert message in error
    assert not os.path.exists(tmp_path / "pvt_v2_b0")


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
    args = segmenter_arguments("pvt_v2_b0", num_classes=3, hafa_options={}, drop_path_rate=0.0, dropout=0.0)
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
    assert "stage_aggregation must be 3 values" in error


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
