"""The `hafa bench`, `hafa visualize` and `hafa export` tools, on the smallest model and small inputs."""

import json

import pytest
import timm
import torch
from PIL import Image

from hafa.cli import main
from hafa.tools import bench, export, visualize
from hafa.tools.bench import report, timing

SMALLEST = "hafa_pvt_v2_b0"


def test_bench_writes_well_formed_json_for_the_smallest_pair(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = [
        "bench",
        "--models",
        SMALLEST,
        "--img-size",
        "64",
        "--batch-sizes",
        "1",
        "2",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    assert result["settings"]["device"] == "cpu"
    assert result["settings"]["reps"] == 1
    assert [row["model"] for row in result["models"]] == ["pvt_v2_b0", SMALLEST]
    for row in result["models"]:
        for kind in ("latency", "forward", "train_step"):
            assert row[kind]["median_ms"] > 0
            assert len(row[kind]["samples_ms"]) == 1
        assert row["params_m"] > 3
        assert row["gmacs"] > 0
        assert row["throughput_img_s"] > 0
        assert row["memory_mb"]["forward"] > 0
        assert row["memory_mb"]["train_step"] > row["memory_mb"]["forward"]
    (ratios,) = result["ratios"]
    assert ratios["model"] == SMALLEST
    assert ratios["baseline"] == "pvt_v2_b0"
    assert 1.0 < ratios["params"] < 1.1
    assert ratios["latency"] > 0
    assert ratios["train_step"] > 0
    table = capsys.readouterr().out
    assert "| pvt_v2_b0 |" in table
    assert "| **HAFA / baseline** |" in table


def test_bench_times_compiled_models_their_compiles_and_a_new_size(tmp_path, monkeypatch, capsys):
    # The eager backend stands in for inductor (whose compile takes minutes here): the plumbing is tested.
    modes, real_compile = [], torch.compile

    def eager_compile(model, mode=None, backend="inductor", fullgraph=False, dynamic=None):
        modes.append((mode, backend, fullgraph, dynamic))
        return real_compile(model, backend="eager", fullgraph=fullgraph, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    path = tmp_path / "bench.json"
    argv = ["bench", "--models", SMALLEST, "--img-size", "64", "--batch-sizes", "1", "2", "--reps", "1"]
    assert main([*argv, "--warmup", "0", "--compile", "default", "--json", str(path)]) == 0
    torch._dynamo.reset()
    assert modes == [("default", "inductor", True, False)] * 2
    result = json.loads(path.read_text())
    assert result["settings"]["compile"] == "default"
    for row in result["models"]:
        assert row["latency"]["median_ms"] > 0
        assert row["train_step"]["median_ms"] > 0
        assert row["operators"] > 100  # counted on the eager model: a compiled one dispatches few aten calls
        assert "memory_mb" not in row
        compiled = row["compile"]
        assert {kind: compiled[kind]["graphs"] for kind in ("latency", "forward", "train_step")} == dict(
            latency=1, forward=1, train_step=1
        )
        assert compiled["new_size"]["img_size"] == 96
        assert compiled["new_size"]["graphs"] == 1  # one static graph for the new size, nothing more
    printed = capsys.readouterr().out
    assert "compiled (default, static shapes" in printed
    assert "| model | compile b1 (s) | compile b2 (s) | compile train (s) | new size 96: graphs |" in printed
    ratios = [dict(model="hafa_pvt_tiny", latency=1.05, forward=1.09, train_step=1.1)]
    assert report.target_lines(ratios, "cpu compiled") == [
        "- hafa_pvt_tiny: latency 1.050 (<= 1.1: met), forward 1.090 (<= 1.08: missed), train_step 1.100 (<= 1.1: met)"
    ]
    assert main([*argv, "--device", "cpu", "--compile", "cudagraphs"]) == 2
    assert "--compile cudagraphs captures CUDA graphs: it needs a GPU" in capsys.readouterr().err


def test_bench_modules_times_laa_and_sia_and_profiles_the_backbone(tmp_path):
    path = tmp_path / "modules.json"
    argv = [
        "bench",
        "--modules",
        "--models",
        SMALLEST,
        "--img-size",
        "64",
        "--batch-sizes",
        "1",
        "2",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--detection-size",
        "96",
        "128",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    result = json.loads(path.read_text())
    layers = [(r["input"], r["transition"], r["layer"], r["baseline_layer"]) for r in result["layers"]]
    assert len(layers) == 9
    assert layers[:3] == [
        ("64x64", "1->2", "LAA", "OverlapPatchEmbed"),
        ("64x64", "2->3", "LAA", "OverlapPatchEmbed"),
        ("64x64", "3->4", "SIA", "OverlapPatchEmbed"),
    ]
    assert layers[-1][0] == "96x128"
    (backbone,) = result["backbones"]
    share = backbone["share"]
    assert 0 < share["clustering"] <= share["sia"] <= backbone["sia_with_dictionary"] < 1
    assert 0 < share["laa"] < 1
    assert share["dictionary"] > 0


def test_bench_rejects_unknown_models(capsys):
    assert main(["bench", "--models", "hafa_pvt_tinyy"]) == 2
    assert "did you mean hafa_pvt_tiny" in capsys.readouterr().err


def test_peak_memory_counts_what_a_call_allocates():
    megabytes = bench.peak_memory_mb(lambda: torch.ones(4, 1024, 1024) + 1, torch.device("cpu"))
    assert 31 < megabytes < 33  # two 16 MB tensors are alive at once


@pytest.mark.parametrize(("img_size", "expected_hw"), [(["96"], (96, 96)), (["80", "128"], (80, 128))])
def test_visualize_writes_a_png_of_the_expected_size(tmp_path, img_size, expected_hw):
    path = tmp_path / "picture.png"
    assert main(["visualize", "--model", SMALLEST, "--img-size", *img_size, "--scale", "1", "-o", str(path)]) == 0
    with Image.open(path) as picture:
        assert picture.size == visualize.figure_size(expected_hw, 1)
        assert picture.size == (3 * expected_hw[1], expected_hw[0] + visualize.TITLE_BAND_PX)


def test_visualize_keeps_the_images_aspect_and_shows_moved_points_from_a_checkpoint(tmp_path, capsys):
    image = tmp_path / "wide.png"
    Image.new("RGB", (300, 150), (40, 120, 200)).save(image)
    model = timm.create_model(SMALLEST)
    for name, param in model.named_parameters():
        if name.endswith("offset.weight"):
            torch.nn.init.normal_(param, std=0.05)
    checkpoint = tmp_path / "moved.pth"
    torch.save(model.state_dict(), checkpoint)
    path = tmp_path / "picture.png"
    argv = [
        "visualize",
        "--model",
        SMALLEST,
        "--image",
        str(image),
        "--checkpoint",
        str(checkpoint),
        "--scale",
        "1",
        "--num-classes",
        "1000",
        "--cluster-ratio",
        "0.1",
        "-o",
        str(path),
    ]
    assert main(argv) == 0
    with Image.open(path) as picture:
        assert picture.size == visualize.figure_size((224, 448), 1)
    out = capsys.readouterr().out
    assert "offsets zero" not in out
    assert "2 LAA layers" in out


def test_sampling_points_map_the_fixed_kernel_onto_image_pixels():
    record = dict(offsets=torch.zeros(1, 18, 4, 4), input_size=(8, 8), geometry=((3, 3), (2, 2), (1, 1)))
    centres, points = visualize.sampling_points(record, (32, 32))
    assert centres.shape == (16, 2)
    assert points.shape == (16, 9, 2)
    # the first output position's kernel covers input pixels -1..1, i.e. image pixels around -2.5, 1.5, 5.5
    assert sorted({float(x) for x in points[0, :, 0]}) == [-2.5, 1.5, 5.5]
    assert centres[0].tolist() == [1.5, 1.5]


def test_export_round_trips_through_onnxruntime_with_a_dynamic_batch(tmp_path):
    model = export.build_model(SMALLEST)
    example = torch.randn(2, 3, 64, 64)
    path = str(tmp_path / "model.onnx")
    export.export_onnx(model, example, path)
    ops = export.onnx_op_counts(path)
    assert ops["GridSample"] == 2
    assert ops["TopK"] >= 2
    assert ops["ScatterElements"] >= 2
    differences = export.onnxruntime_differences(
        path, model, [example, torch.randn(1, 3, 64, 64), torch.randn(3, 3, 64, 64)]
    )
    assert max(differences) < 1e-4, differences


def test_the_compile_check_gives_the_eager_outputs_and_a_new_size_costs_one_graph():
    model = export.build_model(SMALLEST)
    torch._dynamo.reset()
    result = export.compile_check(model, torch.randn(2, 3, 64, 64), reps=1, backend="aot_eager")
    assert result["max_abs_difference"] < 1e-4
    assert result["new_size"]["size"] == [96, 96]
    assert result["new_size"]["graphs"] == 1
    assert result["new_size"]["max_abs_difference"] < 1e-4


@pytest.mark.slow
def test_torch_compile_gives_the_eager_outputs():
    model = export.build_model(SMALLEST)
    result = export.compile_check(model, torch.randn(2, 3, 64, 64), reps=1)
    assert result["max_abs_difference"] < 1e-4
    assert result["new_size"]["max_abs_difference"] < 1e-4


def test_export_refuses_a_batch_of_one_that_would_fix_the_batch_axis(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    assert main(["export", "--model", SMALLEST, "--batch", "1", "-o", str(path)]) == 2
    assert "--batch 1 cannot be traced as a dynamic batch axis" in capsys.readouterr().err
    assert not path.exists()


def test_bench_refuses_fp16_on_cpu(capsys):
    assert main(["bench", "--device", "cpu", "--amp", "fp16", "--models", SMALLEST]) == 2
    assert "--amp fp16 needs a GPU" in capsys.readouterr().err


def test_bench_knows_a_baseline_built_for_one_size():
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2, num_classes=3)
    assert timing.takes_size(swin, torch.randn(1, 3, 64, 64))
    assert not timing.takes_size(swin, torch.randn(1, 3, 96, 96))
    assert timing.takes_size(
        timm.create_model("hafa_swin_tiny_patch4_window7_224", num_classes=3), torch.randn(1, 3, 96, 96)
    )


def test_models_families_lists_every_family_and_every_registered_model(capsys, tmp_path):
    from hafa.models import FAMILIES

    assert main(["models", "--families", "--json", str(tmp_path / "f.json")]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "f.json").read_text())
    assert [r["family"] for r in rows] == [f.name for f in FAMILIES]
    assert sum(r["models"] for r in rows) == len(timm.list_models("hafa_*"))
    convnext = next(r for r in rows if r["family"] == "convnext")
    assert convnext["default"] == ["laa", "laa", "laa"]
    assert convnext["sia_stages"] == []
    assert f"{len(FAMILIES)} families, {len(timm.list_models('hafa_*'))} registered models" in printed
