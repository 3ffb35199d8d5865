"""The cost model (`hafa bench --cost`): launches, bytes and FLOPs on a GPU's code path, counted with fake
CUDA tensors, by part, for a forward and a training step; on the smallest pair and small inputs."""

import contextlib
import io
import json
from collections import Counter
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import hafa  # noqa: F401  (registers the models)
from hafa.cli import main
from hafa.layers import LAA, laa
from hafa.ops import cluster_dpc_knn, clustering, use_kernels
from hafa.tools.bench import cost, count_operators, report
from hafa.tools.flops import count_macs

SMALLEST, SMALLEST_BASELINE = "hafa_pvt_v2_b0", "pvt_v2_b0"
SIZE, BATCH = 64, 2


@pytest.fixture(scope="module")
def cli_rows(tmp_path_factory):
    """`hafa bench --cost --json` on the smallest pair: the rows written, and what it printed."""
    path = tmp_path_factory.mktemp("cost") / "cost.json"
    argv = ["bench", "--cost", "--models", SMALLEST, "--img-size", str(SIZE), "--cost-batch-sizes", "1", str(BATCH)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--json", str(path)]) == 0
    return json.loads(path.read_text()), printed.getvalue()


def test_bench_cost_writes_a_row_per_pass_with_the_counts_of_both_models(cli_rows):
    rows, printed = cli_rows
    assert [(r["pass"], r["batch"]) for r in rows] == [("forward", 1), ("train", BATCH)]
    for row in rows:
        assert (row["model"], row["baseline"], row["kernels"], row["img_size"]) == (
            SMALLEST,
            SMALLEST_BASELINE,
            "torch",
            SIZE,
        )
        for model in ("hafa", "baseline"):
            counts = row["counts"][model]
            assert list(counts["parts"]) == list(cost.PARTS)
            for measure in ("launches", "bytes", "flops"):
                assert counts["total"][measure] == sum(part[measure] for part in counts["parts"].values())
                assert counts["total"][measure] > 0
        hafa_total, baseline_total = row["counts"]["hafa"]["total"], row["counts"]["baseline"]["total"]
        for measure in ("launches", "bytes", "flops"):
            assert row[f"{measure}_ratio"] == round(hafa_total[measure] / baseline_total[measure], 3)
        assert all(part["launches"] == 0 for name, part in row["counts"]["baseline"]["parts"].items() if name != "rest")
        assert all(row["counts"]["hafa"]["parts"][part]["launches"] > 0 for part in ("laa", "clustering", "merging"))
    forward, train = rows
    assert train["counts"]["hafa"]["total"]["flops"] > 2 * BATCH * forward["counts"]["hafa"]["total"]["flops"]
    assert "| **HAFA / baseline** |" in printed


def _eager_gpu_path_forward(name: str, monkeypatch) -> tuple[int, int]:
    """Launches (OperatorCounter, decomposed) and FLOPs of a warm forward on real CPU tensors, on the GPU's
    path for DPC-KNN."""
    monkeypatch.setattr(clustering, "_scans_every_token", lambda x: True)
    monkeypatch.setattr(laa, "_bags_rows", lambda x: False)
    model = timm.create_model(name).eval()
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    with torch.inference_mode():
        model(images)  # builds the kept constants
        launches = count_operators(partial(model, images), decompose=True)
    flops = 2 * count_macs(model, (BATCH, 3, SIZE, SIZE))
    monkeypatch.undo()
    return launches, flops


@pytest.mark.parametrize("name", [SMALLEST, SMALLEST_BASELINE])
def test_fake_cuda_forward_counts_what_the_eager_counter_counts_on_the_gpu_path(name, monkeypatch):
    counted = cost.count_model(partial(timm.create_model, name), {"forward": BATCH}, SIZE)["forward"].cost
    launches, flops = _eager_gpu_path_forward(name, monkeypatch)
    assert counted.total.launches == launches
    assert counted.total.flops == flops


def test_the_replayed_backward_runs_what_the_autograd_engine_runs(monkeypatch):
    # The engine runs on fake CPU tensors (not on fake CUDA ones without a GPU), on the GPU's paths: same
    # operators, same bytes.
    monkeypatch.setattr(clustering, "_scans_every_token", lambda x: True)
    monkeypatch.setattr(laa, "_bags_rows", lambda x: False)
    parts = cost.SourceParts()

    def train_step(backward):
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        model = cost.fake_model(partial(timm.create_model, SMALLEST), fake_mode, device="cpu")
        with fake_mode:
            return cost.count_pass(model, "train", BATCH, SIZE, parts, backward).cost

    replayed = train_step(cost.run_backward)
    by_engine = train_step(lambda loss, counter: loss.backward())
    assert sum(replayed.operators.values(), Counter()) == sum(by_engine.operators.values(), Counter())
    assert (replayed.total.launches, replayed.total.bytes) == (by_engine.total.launches, by_engine.total.bytes)
    assert by_engine.parts["laa"].launches < replayed.parts["laa"].launches  # the engine's ops go to "rest"


class _OneLAA(nn.Module):
    """A conv stem, one LAA layer and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.laa = LAA(8, 16, kernel_size=2, stride=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.laa(self.stem(x)).mean((1, 2)))


def test_an_laa_layers_operators_and_their_gradients_are_counted_under_laa():
    passes = cost.count_model(_OneLAA, {"forward": 1, "train": BATCH}, 16)
    forward, train = passes["forward"].cost.operators, passes["train"].cost.operators
    assert forward["laa"]["grid_sampler_2d"] == 1
    assert forward["laa"]["convolution"] == 1
    assert forward["rest"]["convolution"] == 1  # the stem
    assert train["laa"]["grid_sampler_2d_backward"] == 1
    assert train["laa"]["convolution_backward"] == 1
    assert train["rest"]["convolution_backward"] == 1
    assert train["laa"]["native_batch_norm_backward"] + train["laa"]["cudnn_batch_norm_backward"] == 1
    assert "grid_sampler_2d_backward" not in train["rest"]
    assert not any(train[part] for part in ("clustering", "merging", "dictionary", "sia"))


def _clustering_cost(device: str, kernels: str = "torch") -> cost.PassCost:
    """The cost of DPC-KNN on fake tokens (2 x 49 x 8, 13 clusters) of a device."""
    with FakeTensorMode(), use_kernels(kernels):
        tokens = torch.randn(BATCH, 49, 8, device=device)
        with cost.CostCounter(cost.SourceParts()) as counter:
            cluster_dpc_knn(tokens, 13)
    return counter.cost


def test_fake_cuda_tensors_take_the_gpus_path(monkeypatch):
    with FakeTensorMode():
        assert clustering._scans_every_token(torch.empty(1, 4, 2, device="cuda"))
    on_gpu = _clustering_cost("cuda")
    assert on_gpu.parts["clustering"].launches > 10
    with pytest.raises(DataDependentOutputException):  # the CPU's path reads how many peaks there are
        _clustering_cost("cpu")
    monkeypatch.setattr(clustering, "_scans_every_token", lambda x: True)
    assert _clustering_cost("cpu").parts["clustering"].launches == on_gpu.parts["clustering"].launches


def test_a_triton_op_is_one_launch_of_its_inputs_and_outputs():
    pytest.importorskip("triton")
    fused = _clustering_cost("cuda", "triton")
    assert fused.operators["clustering"] == Counter(dpc_knn=1)
    tokens_bytes, ids_bytes, centres_bytes = BATCH * 49 * 8 * 4, BATCH * 49 * 8, BATCH * 13 * 8
    assert fused.total.bytes == tokens_bytes + ids_bytes + centres_bytes
    assert fused.total.flops > 2 * BATCH * 49 * 49 * 8


def test_the_cost_goals_name_the_parts_that_keep_a_ratio_above_them():
    def counts(laa: int, rest: int) -> dict:
        parts = {part: dict(launches=0, bytes=0, flops=0) for part in cost.PARTS}
        parts["laa"], parts["rest"] = dict(launches=laa, bytes=laa, flops=1), dict(launches=rest, bytes=rest, flops=1)
        return dict(total=dict(launches=laa + rest, bytes=laa + rest, flops=2), parts=parts)

    row = {"model": "hafa_pvt_tiny", "pass": "train", "launches_ratio": 1.3, "bytes_ratio": 1.05}
    row["counts"] = dict(hafa=counts(laa=40, rest=90), baseline=counts(laa=0, rest=100))
    (line,) = report.cost_target_lines([row, {**row, "pass": "forward"}, {**row, "model": SMALLEST}])
    assert line == ("- hafa_pvt_tiny: launches 1.300 (<= 1.2: missed; laa +0.400), bytes 1.050 (<= 1.1: met)")


def test_part_sources_that_no_longer_exist_are_an_error():
    with pytest.raises(LookupError, match="hafa.layers.laa.Moved"):
        cost.SourceParts({"laa": ("hafa.layers.laa.Moved",)})


def test_bytes_count_a_broadcast_dimension_once():
    assert cost.tensor_bytes(torch.zeros(3).expand(4, 3)) == 12
    assert cost.tensor_bytes(torch.zeros(4, 3).t()) == 48
    assert cost.tensor_bytes(torch.zeros(2, 0)) == 0


class _Attention(nn.Module):
    """Self-attention over the pixels of a map, with an additive mask of 49 x 49 (not aligned to 16)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Conv2d(3, 24, kernel_size=1)
        self.bias = nn.Parameter(torch.zeros(49, 49))

    def forward(self, x):
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).unflatten(2, (3, 8)).transpose(1, 2).unbind(1)
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=self.bias).mean((1, 2))


def test_float32_attention_is_counted_as_the_gpus_memory_efficient_kernel():
    passes = cost.count_model(_Attention, {"forward": 1, "train": BATCH}, 7)
    forward, train = passes["forward"].cost.operators["rest"], passes["train"].cost.operators["rest"]
    assert forward["_scaled_dot_product_efficient_attention"] == 1
    assert forward["constant_pad_nd"] == 1  # the mask, padded to 16-element rows
    assert "_safe_softmax" not in forward
    assert "bmm" not in forward
    assert train["_scaled_dot_product_efficient_attention_backward"] == 1
