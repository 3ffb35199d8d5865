"""torch.compile(fullgraph=True) captures a whole HAFA forward, clustering included, on CPU: the
clustering's shapes never depend on the data there (the same path a GPU takes)."""

import copy
import logging
import signal

import pytest
import timm
import torch

import hafa
from hafa.compiled import compile_network
from hafa.ops import cluster_dpc_knn, clustering

FAMILIES = ["hafa_pvt_tiny", "hafa_pvt_v2_b0", "hafa_swin_tiny_patch4_window7_224"]


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_clustering_compiles_as_one_graph_and_gives_the_same_clusters():
    x = torch.randn(2, 70, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[1, 50:] = True
    compiled = torch.compile(cluster_dpc_knn, fullgraph=True, backend="eager")
    for got, want in zip(compiled(x, 17, k=5, mask=mask), cluster_dpc_knn(x, 17, k=5, mask=mask)):
        assert torch.equal(got, want)


def test_compiling_scans_every_token(monkeypatch):
    seen = []
    original = clustering._scans_every_token
    monkeypatch.setattr(clustering, "_scans_every_token", lambda x: seen.append(original(x)) or seen[-1])
    torch.compile(cluster_dpc_knn, fullgraph=True, backend="eager")(torch.randn(1, 30, 4), 8)
    assert seen
    assert all(seen)
    seen.clear()
    cluster_dpc_knn(torch.randn(1, 30, 4), 8)
    assert seen == [False]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_with_a_dynamic_batch_axis(name):
    # The ONNX export's first step: no guard may pin the batch size (hafa export's slow test goes on to ONNX).
    model = timm.create_model(name, num_classes=5).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
        images = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiles_a_hafa_model_as_one_graph():
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=5).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(images)
        got = torch.compile(model, fullgraph=True)(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class _Deadline:
    """Fails a test whose block runs longer than `seconds` (a compile that never ends would hang the suite)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def expire(signum, frame):
            raise TimeoutError(f"did not finish within {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_default_compile_takes_new_input_sizes_as_new_static_graphs():
    # torch.compile's defaults recompile with dynamic shapes after a size change; the models keep their
    # height and width static, so that recompile is another static graph, not a symbolic-shape search.
    model = hafa.convert(timm.create_model("pvt_v2_b0", num_classes=5)).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for size in [(64, 64), (56, 72), (80, 48), (64, 64)]:
            images = torch.randn(2, 3, *size)
            with _Deadline(240):
                got = compiled(images)
            torch.testing.assert_close(got, model(images), rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 3
    with torch.no_grad(), _Deadline(240):  # another batch size: one more graph, the batch may be dynamic
        torch.testing.assert_close(compiled(torch.randn(3, 3, 64, 64)).shape, torch.Size([3, 5]))


def test_a_compiled_network_keeps_a_bounded_number_of_graphs_and_says_so(caplog):
    model = timm.create_model("hafa_pvt_v2_b0", num_classes=5).eval()
    eager = copy.deepcopy(model)
    sized = compile_network(model, "aot_eager", name="net", max_variants=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="hafa"):
        for size in [64, 72, 64, 80, 96, 72]:
            images = torch.randn(1, 3, size, size)
            torch.testing.assert_close(model(images), eager(images), rtol=1e-5, atol=1e-5)
    compiling = [r.message for r in caplog.records if "compiling for input" in r.message]
    assert compiling == [
        "net: compiling for input 1 x 3 x 64 x 64 (evaluation; graph 1 of at most 2)",
        "net: compiling for input 1 x 3 x 72 x 72 (evaluation; graph 2 of at most 2)",
    ]
    assert [r.message for r in caplog.records if "eagerly" in r.message] == [
        "net: 2 compiled graphs kept; inputs of new sizes run eagerly from now on"
    ]
    assert len(sized.compile_seconds) == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    assert set(model.state_dict()) == set(eager.state_dict())  # checkpoints keep the eager names
