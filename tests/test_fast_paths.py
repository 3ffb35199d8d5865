"""The speed-ups of issue 6 compute what the plain forms compute: blocked symmetric distances, kept
distances reused by DPC-KNN, blocked exact neighbour distances."""

import torch

from hafa.ops import clustering
from reference import dpc_knn_reference


def test_blocked_symmetric_distances_equal_one_matmul():
    x = torch.randn(3, 50, 7, dtype=torch.float64)
    left, right = clustering._augmented(x)
    expected = clustering._shifted_distances(left, right)
    for block in (1, 16, 49, 50):
        torch.testing.assert_close(clustering._all_shifted_distances(x, left, right, block=block), expected)


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
