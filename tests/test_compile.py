"""torch.compile(fullgraph=True) captures a whole HAFA forward, clustering included, on CPU: the
clustering's shapes never depend on the data there (the same path a GPU takes)."""

import pytest
import timm
import torch

import hafa  # noqa: F401  (registers the models)
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
def test_every_family_forward_is_one_graph(name):
    model = timm.create_model(name, num_classes=5).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        got = torch.compile(model, fullgraph=True, backend="eager")(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
