"""hafa ablate: a study's rows and seeds as ordinary training runs, reused and resumed by a second call,
a collapse recorded, and the table, CSV and picture written."""

import argparse
import csv
import json

import pytest
from PIL import Image

from hafa.cli import main
from hafa.tasks.job import finish_training
from hafa.tasks.processes import ProcessContext
from hafa.tools import ablate
from hafa.tools.ablate import study_rows
from test_classification import QUICK, write_dataset


@pytest.fixture
def tiny(tmp_path):
    data = write_dataset(tmp_path / "data")
    return ["--data", str(data), "--model", "hafa_pvt_v2_b0", "--epochs", "1", *QUICK]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_study_writes_its_table_csv_and_picture_and_a_second_call_reuses_it(tiny, tmp_path, capsys, caplog):
    out = tmp_path / "study"
    argv = ["ablate", "clustering", *tiny, "--seeds", "0", "1", "--output", str(out)]
    assert main(argv) == 0
    rows = read_csv(out / "ablation.csv")
    assert [(r["row"], r["seed"], r["status"]) for r in rows] == [
        ("Q", "0", "finished"),
        ("Q", "1", "finished"),
        ("QKV", "0", "finished"),
        ("QKV", "1", "finished"),
    ]
    assert [r["cluster_qkv"] for r in rows] == ["false", "false", "true", "true"]
    assert all(float(r["top1"]) >= 0 and r["best_epoch"] == "1" for r in rows)
    assert (out / "Q" / "seed1" / "hafa_pvt_v2_b0" / "best.pth").is_file()
    table = (out / "ablation.md").read_text()
    assert "| Q | " in table
    assert "| QKV | " in table
    # the paper's Table 5 is PVT-Tiny (PVT v1): named, its figures not put beside a PVT v2 model
    assert "the paper ran this study on PVT-Tiny (Table 5), a pvt model; hafa_pvt_v2_b0 is a pvt_v2 model" in table
    assert table.count("| - |") == 2
    assert json.loads((out / "ablation.json").read_text()) == dict(
        study="clustering", task="classification", model="hafa_pvt_v2_b0"
    )
    with Image.open(out / "ablation.png") as picture:
        assert picture.format == "PNG"
    caplog.clear()
    assert main(argv) == 0
    assert "epoch 1/1" not in caplog.text  # nothing trained again
    assert read_csv(out / "ablation.csv") == rows
    capsys.readouterr()
    assert main([*argv, "--set", "smoothing=0.3"]) == 2
    assert "--resume with settings that differ from the saved run" in capsys.readouterr().err
    # another study, or this study of another model, in the same folder: refused, nothing overwritten
    table_before = (out / "ablation.md").read_bytes()
    for other in (
        ["ablate", "knn-k", "--values", "3", *tiny, "--seeds", "0", "--output", str(out)],
        [
            "ablate",
            "clustering",
            *tiny[:2],
            "--model",
            "hafa_pvt_tiny",
            *tiny[4:],
            "--seeds",
            "0",
            "--output",
            str(out),
        ],
    ):
        assert main(other) == 2
        error = capsys.readouterr().err
        assert f"--output {out} holds the clustering study of hafa_pvt_v2_b0 (classification)" in error
        assert "would overwrite its ablation.md, ablation.csv, ablation.png: choose another --output" in error
    assert (out / "ablation.md").read_bytes() == table_before
    assert read_csv(out / "ablation.csv") == rows


def test_a_collapsing_row_is_recorded_not_a_failure(tiny, tmp_path, caplog):
    out = tmp_path / "collapse"
    argv = ["ablate", "knn-k", "--values", "3", "5", *tiny, "--seeds", "0", "--lr", "1e12", "--output", str(out)]
    assert main(argv) == 0
    rows = read_csv(out / "ablation.csv")
    assert [(r["row"], r["status"]) for r in rows] == [("knn_k=3", "collapsed"), ("knn_k=5", "collapsed")]
    assert "collapsed" in (out / "ablation.md").read_text()
    caplog.clear()
    assert main(argv) == 0
    assert "the loss became" not in caplog.text  # recorded, not run again


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["clustering", "--seed", "3"], "--seed is for hafa ablate to decide"),
        (["stages", "--values", "0.1"], "--values is for the cluster-ratio and knn-k studies"),
        (["stages", "--stage-aggregation", "laa", "laa", "sia"], "--stage-aggregation: the stages study sets it"),
        (["cluster-ratio", "--values", "0"], "--values must be a list of at least 1 numbers > 0 and <= 1"),
        (["clustering", "--keep", "best"], "hafa ablate keeps both checkpoints"),
        (["knn-k", "--values", "3", "3"], "--values 3 3: each value once (knn_k=3 given more than once"),
        (["cluster-ratio", "--values", "0.1234567", "0.1234568"], "(cluster_ratio=0.123457 given more than once"),
        (["cluster-ratio", "--values", "0.25", "0.250"], "--values 0.25 0.250: each value once"),
    ],
)
def test_options_the_study_decides_are_refused(tiny, tmp_path, capsys, extra, message):
    assert main(["ablate", *extra, *tiny, "--output", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("pvt_v2_b0", "the baseline pvt_v2_b0 has none (every row would train the same network); study its HAFA form"),
        ("hafa_pvt_v9", "unknown HAFA model 'hafa_pvt_v9'"),
    ],
)
def test_a_study_of_a_model_without_hafa_options_is_refused(tiny, tmp_path, capsys, model, message):
    without_model = tiny[:2] + tiny[4:]
    assert main(["ablate", "clustering", *without_model, "--model", model, "--output", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_stages_study_has_the_papers_rows():
    names = [row.name for row in study_rows("stages", None)]
    assert names[:4] == ["SIA-SIA-SIA", "LAA-SIA-SIA", "LAA-LAA-SIA", "LAA-LAA-LAA"]
    assert names[-1] == "CONV-CONV-CONV"
    assert {"LAA-LAA-CONV", "LAA-CONV-CONV", "CONV-LAA-SIA", "CONV-CONV-SIA"} <= set(names)


def test_rows_choose_part_of_a_study_by_name(tiny, tmp_path, capsys):
    out = tmp_path / "two"
    assert (
        main(
            [
                "ablate",
                "knn-k",
                "--values",
                "3",
                "5",
                "7",
                "--rows",
                "KNN_K=7",
                "knn_k=3",
                *tiny,
                "--seeds",
                "0",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert [r["row"] for r in read_csv(out / "ablation.csv")] == ["knn_k=3", "knn_k=7"]
    assert main(["ablate", "stages", "--rows", "LAA-LAA-SIA", "SIA-LAA-LAA", *tiny, "--output", str(out)]) == 2
    assert "--rows SIA-LAA-LAA: the stages study's rows are SIA-SIA-SIA, LAA-SIA-SIA" in capsys.readouterr().err


def test_the_papers_figures_stand_beside_models_of_the_family_it_ran_the_study_on():
    figures, caption = ablate.paper_figures("stages", "classification", "hafa_pvt_v2_b1")
    assert figures["LAA-LAA-SIA"] == "79.8, 16.3 ms"
    assert caption.startswith("Paper: PVT-v2-B1 on ImageNet-1k")
    figures, caption = ablate.paper_figures("stages", "classification", "hafa_swin_tiny_patch4_window7_224")
    assert figures == {}
    assert "hafa_swin_tiny_patch4_window7_224 is a swin model, so its figures are left out" in caption
    assert "Paper: PVT-v2-B1" not in caption
    assert ablate.paper_figures("clustering", "detection", "hafa_pvt_tiny")[0]["Q"] == "39.8 box / 37.1 mask AP"
    assert ablate.paper_figures("knn-k", "classification", "hafa_pvt_v2_b0") == ({}, None)


def test_a_stopped_run_of_a_study_says_to_run_the_study_again(capsys):
    run = ablate._run_args(
        argparse.Namespace(skip_data_check=False, continue_with="the same command plus --resume"),
        ablate.Row(name="Q", options=dict(cluster_qkv=False)),
        0,
        "out",
        "hafa_pvt_v2_b0",
        True,
    )
    interrupted = [dict(status="interrupted", run_dir="out/Q/seed0/hafa_pvt_v2_b0")]
    assert finish_training(interrupted, ProcessContext(), lambda results: None, run.continue_with) == 130
    printed = capsys.readouterr().out
    assert "continue with the same hafa ablate command (it resumes the run itself)" in printed
    assert "--resume" not in printed  # which hafa ablate refuses
