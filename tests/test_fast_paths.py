"""The fast paths compute what the plain forms compute: blocked symmetric distances, kept
distances reused by DPC-KNN, blocked exact neighbour distances, LAA's samples bagged into rows."""

import pytest
import torch
from torchvision.ops import deform_conv2d

from hafa.layers import LAA, deformable_samples
from hafa.layers.laa import sample_columns
from hafa.ops import clustering
from reference import dpc_knn_reference


def test_blocked_symmetric_distances_equal_one_matmul():
    x = torch.randn(3, 50, 7, dtype=torch.float64)
    sq = x.square().sum(-1)
    expected = torch.cdist(x, x).square() - sq[:, :, None]
    for block in (1, 16, 49, 50):
        torch.testing.assert_close(clustering._all_shifted_distances(x, sq, block=block), expected)


def test_dpc_knn_with_blocked_distances_and_small_cache_blocks_matches_the_reference(monkeypatch):
    monkeypatch.setattr(clustering, "_GRAM_BLOCK", 8)
    monkeypatch.setattr(clustering, "_CACHE_BLOCK_ELEMENTS", 20)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 45, 6, generator=g, dtype=torch.float64)
    ids, centres = clustering.cluster_dpc_knn(x, 12, k=4)
    for b in range(2):
        ref_ids, ref_centres, _, _ = dpc_knn_reference(x[b], 12, 4)
        assert centres[b].tolist() == ref_centres.tolist()
        assert ids[b].tolist() == ref_ids.tolist()


def _scan_every_token(monkeypatch):
    monkeypatch.setattr(clustering, "_scans_every_token", lambda x: True)


@pytest.mark.parametrize("seed", range(6))
def test_dpc_knn_scanning_every_token_matches_the_reference(monkeypatch, seed):
    # The GPU / compiled path (fixed shapes, no sync), run on CPU.
    _scan_every_token(monkeypatch)
    g = torch.Generator().manual_seed(200 + seed)
    x = torch.randn(2, 33, 5, generator=g, dtype=torch.float64)
    if seed % 2:
        x = torch.randint(-2, 3, (2, 33, 5), generator=g).double()  # tied densities and distances
    mask = torch.zeros(2, 33, dtype=torch.bool)
    mask[1, 25:] = True
    ids, centres = clustering.cluster_dpc_knn(x, 9, k=4, mask=mask if seed > 2 else None)
    for b in range(2):
        ref_ids, ref_centres, _, _ = dpc_knn_reference(x[b], 9, 4, mask[b] if seed > 2 else None)
        assert centres[b].tolist() == ref_centres.tolist()
        assert ids[b].tolist() == ref_ids.tolist()


def test_dpc_knn_scanning_every_token_in_row_chunks_equals_the_peak_path(monkeypatch):
    x = torch.randn(3, 120, 16, generator=torch.Generator().manual_seed(9))
    expected = clustering.cluster_dpc_knn(x, 30)
    _scan_every_token(monkeypatch)
    monkeypatch.setattr(clustering, "_MAX_BLOCK_ELEMENTS", 3 * 120 * 7)  # distances not kept, 7 rows a chunk
    for got, want in zip(clustering.cluster_dpc_knn(x, 30), expected):
        assert torch.equal(got, want)


def test_dpc_knn_ignores_autocast():
    # Far from the origin, bf16 products cannot tell the neighbours apart: clustering must stay in float32.
    x = 100 + torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(4))
    expected = clustering.cluster_dpc_knn(x, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = clustering.cluster_dpc_knn(x, 16)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "kx_major"), [(3, 2, 1, False), (2, 2, 0, True), (3, 1, 0, False)]
)
def test_bagged_sample_rows_equal_grid_sample_and_their_gradients(kernel, stride, padding, kx_major):
    # The CPU path of LAA's sampling against the grid_sample form (the GPU's and export's), float64:
    # points inside, on the border, and far outside the map (offsets up to 9 pixels), an odd-sized map.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 11, 9, generator=g, dtype=torch.float64).requires_grad_()
    Ho, Wo = (11 + 2 * padding - kernel) // stride + 1, (9 + 2 * padding - kernel) // stride + 1
    offsets = torch.randn(2, 2 * kernel * kernel, Ho, Wo, generator=g, dtype=torch.float64) * 3
    offsets[0, :, 0, 0] = 9.0
    offsets = offsets.requires_grad_()
    rows = sample_columns(x, offsets, kernel, stride, padding, kx_major)
    samples = deformable_samples(x, offsets, kernel, stride, padding).view(2, 5, kernel, kernel, Ho * Wo)
    expected = (samples.permute(0, 4, 3, 2, 1) if kx_major else samples.permute(0, 4, 2, 3, 1)).reshape(rows.shape)
    torch.testing.assert_close(rows, expected)
    weights = torch.randn(rows.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((rows * weights).sum(), (x, offsets))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (x, offsets))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_laa_on_cpu_bags_its_samples_and_equals_deform_conv2d():
    laa = LAA(6, 10, 3, 2, 1, norm_layer=None, laa_norm="baseline").double()
    torch.nn.init.normal_(laa.offset.weight, std=0.5)
    x = torch.randn(2, 6, 13, 10, dtype=torch.float64)
    with torch.no_grad():
        offsets = laa.offset(x)
        expected = deform_conv2d(x, offsets, laa.proj.weight, laa.proj.bias, stride=2, padding=1)
        torch.testing.assert_close(laa(x).permute(0, 3, 1, 2), expected)
        compiled = torch.compile(laa, fullgraph=True, backend="aot_eager", dynamic=False)
        torch.testing.assert_close(compiled(x), laa(x))
