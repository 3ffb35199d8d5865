"""The Triton kernels (hafa.ops.kernels) against the PyTorch path, which is the reference.

Without a GPU they run on CPU tensors in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1),
in float32 and at small sizes; the `cuda` tests repeat the comparisons on a GPU, in float32, bfloat16
and float16 for LAA (DPC-KNN always runs in float32).
"""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from hafa.layers import LAA, LAAPatchMerging, deformable_samples  # noqa: E402
from hafa.ops import cluster_dpc_knn, kernel_mode, use_kernels  # noqa: E402
from hafa.ops.kernels import FASTER_WITH_TRITON, MeasuredFaster, laa_columns, selection, use_triton  # noqa: E402

# The interpreter computes log(0) = -inf (the relative distance of a duplicated token) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
INTERPRETED = pytest.mark.skipif(
    not selection.interpreting(), reason="CPU tensors need TRITON_INTERPRET=1 (conftest.py sets it without a GPU)"
)
DEVICES = [pytest.param("cpu", marks=INTERPRETED, id="cpu"), pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]
HALF_DTYPES = [torch.bfloat16, torch.float16]
# (kernel, stride, padding, map size): PVT v2's 3x3/s2/p1 on odd maps, and 2x2/s2 on odd and even maps
GEOMETRIES = [(3, 2, 1, (7, 9)), (3, 2, 1, (5, 5)), (2, 2, 0, (7, 9)), (2, 2, 0, (6, 8))]


@pytest.fixture(autouse=True)
def restore_kernel_mode():
    saved = kernel_mode()
    yield
    use_kernels(saved)


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """The PyTorch path's float32 matmuls in float32 on a GPU (TF32 would move the clusters)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _on_both_paths(fn):
    """fn() with use_kernels("torch"), then with use_kernels("triton")."""
    with use_kernels("torch"):
        expected = fn()
    with use_kernels("triton"):
        got = fn()
    return expected, got


def _offsets(batch, kernel, out_size, device, generator):
    """Random offsets, a few pixels large, some points far outside the map."""
    offsets = 2 * torch.randn(batch, 2 * kernel * kernel, *out_size, generator=generator)
    offsets[:, 0, 0, 0] = 40.0  # the first point of the first pixel far below the map
    offsets[:, 1, -1, -1] = -30.0  # and of the last pixel far left of it
    return offsets.to(device)


def _out_size(size, kernel, stride, padding):
    return tuple((s + 2 * padding - kernel) // stride + 1 for s in size)


def _reference_columns(x, offsets, kernel, stride, padding):
    """The PyTorch path's samples in the kernel's layout, B x Ho*Wo x K x C."""
    samples = deformable_samples(x, offsets, kernel, stride, padding)  # B x C x K x Ho x Wo
    B, C, K, Ho, Wo = samples.shape
    return samples.permute(0, 3, 4, 2, 1).reshape(B, Ho * Wo, K, C)


def _columns_and_gradients(columns_fn, x, offsets, grad):
    x, offsets = x.detach().requires_grad_(), offsets.detach().requires_grad_()
    columns = columns_fn(x, offsets)
    return (columns, *torch.autograd.grad((columns * grad).sum(), (x, offsets)))


def _check_columns(device, kernel, stride, padding, size, channels=6, channels_last=False):
    g = torch.Generator().manual_seed(kernel * 100 + size[0] * 10 + size[1])
    x = torch.randn(2, channels, *size, generator=g).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    offsets = _offsets(2, kernel, _out_size(size, kernel, stride, padding), device, g)
    grad = torch.randn(2, offsets.shape[2] * offsets.shape[3], kernel * kernel, channels, generator=g).to(device)
    with use_kernels("triton"):
        got = _columns_and_gradients(
            lambda x, o: laa_columns(x, o, (kernel, kernel), (stride, stride), (padding, padding)), x, offsets, grad
        )
    want = _columns_and_gradients(lambda x, o: _reference_columns(x, o, kernel, stride, padding), x, offsets, grad)
    for name, a, b, tol in zip(("columns", "grad x", "grad offsets"), got, want, (1e-5, 1e-4, 1e-4)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")
    assert got[1].stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size", "channels_last"),
    [(*geometry, channels_last) for geometry, channels_last in zip(GEOMETRIES, [False, True, False, True])],
)
def test_laa_columns_are_the_pytorch_samples_with_gradients(device, kernel, stride, padding, size, channels_last):
    _check_columns(device, kernel, stride, padding, size, channels_last=channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_laa_columns_over_several_pixel_and_channel_tiles(device, monkeypatch):
    from hafa.ops.kernels import _laa_triton

    monkeypatch.setattr(_laa_triton, "laa_tiles", lambda channels, backward: (16, 4))
    _check_columns(device, 3, 2, 1, (7, 9), channels=10, channels_last=True)  # 3 pixel tiles x 3 channel tiles
    _check_columns(device, 2, 2, 0, (7, 9), channels=10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
def test_laa_columns_in_half_precision_round_only_the_results(dtype):
    # The PyTorch path in bf16 / fp16 also rounds its sampling grid to that dtype (up to a tenth of a
    # pixel off on a 56-wide map); the kernel rounds only what it writes. Both are measured against the
    # PyTorch path in float32 on the same rounded inputs: the kernel must be as close, and close.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 29, 31, generator=g).cuda().to(dtype)
    offsets = _offsets(4, 3, (15, 16), "cpu", g)
    # a quarter pixel or more from whole pixels, where the offsets' gradient jumps: rounded offsets
    # would land on them, and the float32 grid of the reference lands just beside
    offsets = (offsets.floor() + 0.25 + 0.5 * torch.rand(offsets.shape, generator=g)).cuda().to(dtype)
    grad = torch.randn(4, 15 * 16, 9, 32, generator=g).cuda().to(dtype)
    with use_kernels("triton"):
        got = _columns_and_gradients(lambda x, o: laa_columns(x, o, (3, 3), (2, 2), (1, 1)), x, offsets, grad)
    same_dtype = _columns_and_gradients(lambda x, o: _reference_columns(x, o, 3, 2, 1), x, offsets, grad)
    want = _columns_and_gradients(
        lambda x, o: _reference_columns(x, o, 3, 2, 1), x.float(), offsets.float(), grad.float()
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for a, b, w in zip(got, same_dtype, want):
        assert a.dtype == dtype
        scale = w.abs().max()
        torch.testing.assert_close(a.float(), w, atol=tol * scale, rtol=tol)
        assert (a.float() - w).abs().max() <= max((b.float() - w).abs().max(), tol * scale)


def _gradients(module, x):
    x = x.detach().requires_grad_()
    out = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    return (
        out,
        *torch.autograd.grad(
            (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum(), (x, *params)
        ),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("kernel", "stride", "padding", "size"), [GEOMETRIES[1], GEOMETRIES[2]])
def test_laa_is_the_same_layer_on_both_paths(device, kernel, stride, padding, size):
    torch.manual_seed(0)
    laa = LAA(in_channels=6, out_channels=10, kernel_size=kernel, stride=stride, padding=padding).to(device)
    nn.init.normal_(laa.offset.weight, std=0.5)
    nn.init.normal_(laa.offset.bias, std=1.0)
    x = torch.randn(2, 6, *size, device=device)
    expected, got = _on_both_paths(lambda: _gradients(laa, x))  # output; grads of x, offset, proj, norm
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(7, 9), (6, 6)])
def test_swin_laa_patch_merging_is_the_same_on_both_paths(device, size):
    torch.manual_seed(0)
    merging = LAAPatchMerging(dim=6, out_dim=10).to(device)
    nn.init.normal_(merging.offset.weight, std=0.5)
    nn.init.normal_(merging.offset.bias, std=1.0)
    nn.init.normal_(merging.norm.weight)  # LayerNorm over the (kx, ky, C) concatenation: its order shows
    x = torch.randn(2, *size, 6, device=device)  # NHWC, as timm's patch merging takes it
    expected, got = _on_both_paths(lambda: _gradients(merging, x))
    assert got[0].shape == (2, -(-size[0] // 2), -(-size[1] // 2), 10)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _check_partitions(x, num_clusters, k, mask=None):
    expected, got = _on_both_paths(lambda: cluster_dpc_knn(x, num_clusters, k=k, mask=mask))
    assert torch.equal(got[1], expected[1]), (got[1], expected[1])
    assert torch.equal(got[0], expected[0]), (got[0], expected[0])


def _random_mask(batch, num_tokens, generator):
    mask = torch.rand(batch, num_tokens, generator=generator) < 0.3
    mask[-1, 2:] = True  # an image with fewer real tokens than clusters: padding fills in token order
    return mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_dpc_knn_gives_the_partitions_of_the_pytorch_path(device, seed):
    g = torch.Generator().manual_seed(seed)
    N, C = int(torch.randint(2, 60, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    x = torch.randn(3, N, C, generator=g)
    mask = _random_mask(3, N, g) if seed % 2 else None
    num_clusters = int(torch.randint(1, N + 1, (1,), generator=g))
    k = int(torch.randint(1, 8, (1,), generator=g))
    _check_partitions(x.to(device), num_clusters, k, None if mask is None else mask.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_dpc_knn_breaks_ties_as_the_pytorch_path(device, seed):
    # Few distinct integer tokens, many duplicates: distances, densities and scores tie exactly.
    g = torch.Generator().manual_seed(100 + seed)
    palette = torch.randint(-2, 3, (4, 5), generator=g).float()
    x = palette[torch.randint(0, 4, (2, 41), generator=g)]
    mask = _random_mask(2, 41, g) if seed % 2 else None
    num_clusters = int(torch.randint(1, 30, (1,), generator=g))
    _check_partitions(x.to(device), num_clusters, 5, None if mask is None else mask.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("N", "num_clusters", "k", "masked"),
    [(1, 1, 5, False), (1, 3, 5, True), (7, 3, 9, False), (9, 20, 5, True), (33, 8, 1, False), (5, 5, 5, True)],
    ids=["one-token", "one-padded-token", "k>=N", "clusters>=N", "k=1", "clusters=k=N"],
)
def test_dpc_knn_edge_sizes(device, N, num_clusters, k, masked):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(2, N, 3, generator=g)
    mask = torch.arange(N) % 3 == 1 if masked else None  # one mask for every image (broadcast)
    _check_partitions(x.to(device), num_clusters, k, None if mask is None else mask.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tied", [False, True], ids=["random", "tied"])
def test_dpc_knn_over_several_tiles(device, tied, monkeypatch):
    from hafa.ops.kernels import _dpc_knn_triton

    monkeypatch.setattr(_dpc_knn_triton, "dpc_tiles", lambda k: (16, 16, 16))  # 4 x 4 tiles, 2 feature blocks
    g = torch.Generator().manual_seed(5)
    if tied:
        x = torch.randint(-1, 2, (6, 20), generator=g).float()[torch.randint(0, 6, (2, 57), generator=g)]
    else:
        x = torch.randn(2, 57, 20, generator=g)
    mask = torch.zeros(2, 57, dtype=torch.bool)
    mask[1, 40:] = True  # a padded image
    _check_partitions(x.to(device), 40, 5, mask.to(device))  # centres over 3 tiles too


@pytest.mark.parametrize("device", DEVICES)
def test_dpc_knn_on_overflowing_and_non_finite_tokens_is_the_pytorch_paths_partition(device):
    # Squared distances of x * 1e20 overflow float32: the kernel read an unset centre index (or crashed).
    g = torch.Generator().manual_seed(3)
    small, large = torch.randn(1, 8, 4, generator=g) * 1e20, torch.randn(2, 20, 8, generator=g) * 1e20
    nan, infinite = torch.randn(2, 12, 4, generator=g), torch.randn(2, 12, 4, generator=g)
    nan[0, 3, 1], nan[1] = float("nan"), float("nan")
    infinite[0, 2], infinite[1, 5, 0] = float("inf"), -float("inf")
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    for x, num_clusters, padding in ((small, 2, None), (large, 4, None), (nan, 3, mask), (infinite, 3, None)):
        padding = None if padding is None else padding.to(device)
        _check_partitions(x.to(device), num_clusters, 5, padding)
        ids, centres = cluster_dpc_knn(x.to(device), num_clusters, mask=padding)
        assert int(ids.min()) >= 0
        assert int(ids.max()) < num_clusters
        assert int(centres.min()) >= 0
        assert int(centres.max()) < x.shape[1]


@pytest.mark.cuda
@pytest.mark.parametrize(("B", "N", "C"), [(64, 196, 320), (2, 1024, 320), (2, 4200, 320), (3, 4200, 64)])
def test_dpc_knn_at_classification_and_detection_sizes(B, N, C):
    g = torch.Generator().manual_seed(N)
    x = torch.randn(B, N, C, generator=g).cuda()
    mask = torch.zeros(B, N, dtype=torch.bool, device="cuda")
    mask[-1, N * 3 // 4 :] = True
    _check_partitions(x, -(-N // 4), 5, mask)


def test_use_kernels_as_a_function_returns_the_previous_mode():
    use_kernels("torch")
    assert kernel_mode() == "torch"
    previous = use_kernels("auto")
    assert previous == "torch"
    assert kernel_mode() == "auto"
    use_kernels(previous)
    assert kernel_mode() == "torch"


def test_use_kernels_as_a_context_manager_restores_the_mode():
    use_kernels("auto")
    with use_kernels("triton"):
        assert kernel_mode() == "triton"
        with use_kernels("torch"):
            assert kernel_mode() == "torch"
        assert kernel_mode() == "triton"
    assert kernel_mode() == "auto"
    with pytest.raises(KeyError), use_kernels("torch"):
        raise KeyError
    assert kernel_mode() == "auto"


def test_use_kernels_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="one of"):
        use_kernels("cuda")
    assert kernel_mode() == "auto"


def test_auto_takes_the_pytorch_path_on_cpu_even_where_triton_was_measured_faster(monkeypatch):
    x = torch.randn(2, 4, 8, 8)
    assert kernel_mode() == "auto"
    assert not use_triton("laa", x, x.numel())
    assert not use_triton("dpc_knn", x, 8)
    measured = MeasuredFaster(capability=(9, 0), dtype=torch.float32, min_size=1, max_size=2**40, source="test")
    monkeypatch.setitem(FASTER_WITH_TRITON, "laa", (measured,))
    assert not use_triton("laa", x, x.numel())
    monkeypatch.setattr("hafa.layers.laa.laa_columns", None)  # LAA would fail if it took the kernel
    LAA(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1)(x)


@pytest.mark.cuda
def test_auto_takes_triton_on_the_gpus_in_its_table(monkeypatch):
    x = torch.randn(2, 4, 8, 8, device="cuda")
    assert not use_triton("laa", x, x.numel())
    here = torch.cuda.get_device_capability()
    measured = MeasuredFaster(capability=here, dtype=torch.float32, min_size=1, max_size=x.numel(), source="test")
    monkeypatch.setitem(FASTER_WITH_TRITON, "laa", (measured,))
    assert use_triton("laa", x, x.numel())
    assert not use_triton("laa", x.half(), x.numel())
    assert not use_triton("laa", x, x.numel() + 1)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 4, 6, 6)
    with use_kernels("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_triton("laa", x, x.numel())
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        laa_columns(x, torch.zeros(1, 8, 3, 3), (2, 2), (2, 2), (0, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_stays_on_the_pytorch_path(device):
    x = torch.randn(2, 20, 4, dtype=torch.float64, device=device)
    with use_kernels("triton"):
        assert not use_triton("laa", x, x.numel())
        assert not use_triton("dpc_knn", x, 20)
        got = cluster_dpc_knn(x, 5)
    with use_kernels("torch"):
        expected = cluster_dpc_knn(x, 5)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


class _LaaThenClusters(nn.Module):
    """Both kernels in one forward: LAA, then DPC-KNN over its output tokens."""

    def __init__(self):
        super().__init__()
        self.laa = LAA(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, laa_norm="baseline")
        nn.init.normal_(self.laa.offset.weight, std=0.5)

    def forward(self, x):
        y = self.laa(x)
        ids, _ = cluster_dpc_knn(y.flatten(1, 2), 4)
        return y, ids


class _RecordOperators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operators = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators.append(func)
        return func(*args, **(kwargs or {}))


def _hafa_operators(targets) -> list[str]:
    return sorted(str(t) for t in targets if str(t).startswith("hafa."))


@INTERPRETED
def test_compile_traces_both_kernels_as_one_operator_each_in_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _LaaThenClusters(), torch.randn(2, 4, 9, 7)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with use_kernels("triton"):
        expected = model(x)
        got = torch.compile(model, fullgraph=True, backend=recording_backend)(x)
    assert len(graphs) == 1
    assert _hafa_operators(n.target for n in graphs[0].graph.nodes) == [
        "hafa.dpc_knn.default",
        "hafa.laa_columns.default",
    ]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    torch._dynamo.reset()


@INTERPRETED
def test_compile_with_aot_autograd_gives_the_eager_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _LaaThenClusters(), torch.randn(2, 4, 9, 7)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    grads = []
    with use_kernels("triton"):
        for forward in (model, compiled):
            y, ids = forward(x)
            grads.append(torch.autograd.grad((y * y).sum(), list(model.parameters())))
            assert ids.shape == (2, 20)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@INTERPRETED
def test_export_and_fake_tensors_see_one_operator_per_kernel():
    torch.manual_seed(0)
    model, x = _LaaThenClusters(), torch.randn(2, 4, 9, 7)
    with use_kernels("triton"), torch.no_grad():
        program = torch.export.export(model, (x,))
        assert _hafa_operators(n.target for n in program.graph.nodes) == [
            "hafa.dpc_knn.default",
            "hafa.laa_columns.default",
        ]
        for a, b in zip(program.module()(x), model(x)):
            assert torch.equal(a, b)
    with use_kernels("triton"), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, _RecordOperators() as recorded:
        y, ids = model(fake_mode.from_tensor(x))
    assert (y.shape, ids.shape) == ((2, 5, 4, 8), (2, 20))
    assert _hafa_operators(recorded.operators) == ["hafa.dpc_knn.default", "hafa.laa_columns.default"]
    assert not any("grid_sampler" in str(op) for op in recorded.operators)


def test_hafa_imports_and_runs_without_triton():
    script = """
import sys
sys.modules["triton"] = None  # as on a machine without triton
import torch
import hafa
from hafa.layers import LAA
from hafa.ops import cluster_dpc_knn, kernel_mode, use_kernels
assert kernel_mode() == "auto"
assert torch.ops.hafa.laa_columns.default is not None and torch.ops.hafa.dpc_knn.default is not None
assert LAA(4, 8, 3, 2, 1)(torch.randn(2, 4, 9, 9)).shape == (2, 5, 5, 8)
assert cluster_dpc_knn(torch.randn(2, 30, 4), 8)[1].shape == (2, 8)
try:
    use_kernels("triton")
except RuntimeError as e:
    assert "needs the triton package" in str(e), e
else:
    raise AssertionError("use_kernels('triton') without triton")
assert not any(name.startswith("hafa.ops.kernels._") and "triton" in name for name in sys.modules)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hafa.ops.kernels import _dpc_knn_triton as dpc, _laa_triton as laa

def build(kernel, pointers, constexprs):
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], kernel

for dtype in ("fp32", "bf16", "fp16"):
    for backward in (False, True):
        pixels, channels = laa.laa_tiles(64, backward)
        geometry = dict(KH=3, KW=3, KX_MAJOR=backward, BLOCK_P=pixels, BLOCK_C=channels)
        if backward:
            names = ("grad_ptr", "x_ptr", "off_ptr", "grad_off_ptr")
            build(laa._columns_backward_kernel, {**dict.fromkeys(names, "*" + dtype), "grad_x_ptr": "*fp32"}, geometry)
        else:
            build(laa._columns_kernel, dict.fromkeys(("x_ptr", "off_ptr", "col_ptr"), "*" + dtype), geometry)
rows, columns, features = dpc.dpc_tiles(5)
tiles = dict(BLOCK_R=rows, BLOCK_J=columns)
lists = dict(x_ptr="*fp32", mask_ptr="*u8", knn_ptr="*i32", knn_d2_ptr="*fp32", mean_ptr="*fp32", score_ptr="*fp32")
for has_mask in (False, True):
    build(dpc._neighbours_kernel, lists, dict(HAS_MASK=has_mask, BLOCK_C=features, K_SLOTS=8, **tiles))
    build(dpc._relative_distance_kernel, lists, dict(HAS_MASK=has_mask, BLOCK_C=features, K_SLOTS=8, **tiles))
    build(dpc._rank_kernel, dict(score_ptr="*fp32", mask_ptr="*u8", order_ptr="*i32"), dict(HAS_MASK=has_mask, **tiles))
assignment = dict(x_ptr="*fp32", order_ptr="*i32", ids_ptr="*i64", centres_ptr="*i64")
build(dpc._assign_kernel, assignment, dict(BLOCK_C=features, **tiles))
"""


@pytest.mark.slow
def test_every_kernel_compiles_for_a_hopper_gpu():
    # The compiled path, which the interpreter never takes, down to a cubin by the ptxas that ships with
    # triton: no GPU needed (under a minute on 2 cores).
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], check=True, timeout=600, env=env)
