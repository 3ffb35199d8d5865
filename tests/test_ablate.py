"""hafa ablate: a study's rows and seeds as ordinary training runs, reused and resumed by a second call,
a collapse recorded, and the table, CSV and picture written."""

import csv

import pytest
from PIL import Image

from hafa.cli import main
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
    assert "PVT-Tiny (Table 5)" in table
    with Image.open(out / "ablation.png") as picture:
        assert picture.format == "PNG"
    caplog.clear()
    assert main(argv) == 0
    assert "epoch 1/1" not in caplog.text  # nothing trained again
    assert read_csv(out / "ablation.csv") == rows
    capsys.readouterr()
    assert main([*argv, "--set", "smoothing=0.3"]) == 2
    assert "--resume with settings that differ from the saved run" in capsys.readouterr().err


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
    ],
)
def test_options_the_study_decides_are_refused(tiny, tmp_path, capsys, extra, message):
    assert main(["ablate", *extra, *tiny, "--output", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


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
