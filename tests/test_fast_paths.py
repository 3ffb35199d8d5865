"""The speed-ups of issue 6 compute what the plain forms compute: blocked symmetric distances, kept
distances reused by DPC-KNN, blocked exact neighbour distances, and the dictionary's matrices."""
import math

import torch

import pytest

from hafa.ops import clustering, map2token, token2map, token_map
from hafa.ops.token_map import map2token_matrix, token2map_matrix
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
        assert centres[b].tolist() == ref_centres.tolist() and ids[b].tolist() == ref_ids.tolist()


def test_dictionary_matrices_are_averaging_matrices():
    grid, out, M = (7, 9), (4, 5), 11
    index = torch.randint(0, M, (2, 63))
    index[:, :M] = torch.arange(M)  # every token has a cell
    paint = token2map_matrix(index, grid, out, M)
    assert paint.shape == (2, 20, M)
    torch.testing.assert_close(paint.sum(-1), torch.ones(2, 20))  # each pixel is an average of tokens
    gather = map2token_matrix(index, grid, out, M)
    assert gather.shape == (2, M, 20)
    torch.testing.assert_close(gather.sum(-1), torch.ones(2, M))  # each token is an average of pixels
    tokens = torch.randn(2, M, 3)
    torch.testing.assert_close(token2map(tokens, index, grid, out).flatten(2).transpose(1, 2), paint @ tokens)
    fmap = torch.randn(2, 3, *out)
    torch.testing.assert_close(map2token(fmap, index, grid, M), gather @ fmap.flatten(2).transpose(1, 2))


def test_dictionary_in_bfloat16():
    index = torch.randint(0, 5, (1, 12))
    tokens = torch.randn(1, 5, 4, dtype=torch.bfloat16)
    fmap = token2map(tokens, index, (3, 4), (2, 2))
    assert fmap.dtype == torch.bfloat16 and fmap.shape == (1, 4, 2, 2)
    assert map2token(fmap, index, (3, 4), 5).dtype == torch.bfloat16
    assert math.isfinite(float(fmap.float().sum()))


@pytest.mark.parametrize("grid,size", [((7, 9), (4, 5)), ((7, 9), (7, 9)), ((5, 6), (11, 13)), ((8, 8), (3, 8))])
def test_dictionary_by_gather_and_scatter_equals_the_matrices(monkeypatch, grid, size):
    """Beyond DENSE_LIMIT (large maps of many tokens) both directions gather and scatter instead."""
    M = 13
    index = torch.randint(0, M, (2, grid[0] * grid[1]), generator=torch.Generator().manual_seed(1))
    tokens = torch.randn(2, M, 3, dtype=torch.float64, requires_grad=True)
    fmap = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    dense = token2map(tokens, index, grid, size), map2token(fmap, index, grid, M)
    dense_grads = torch.autograd.grad(sum(x.square().sum() for x in dense), (tokens, fmap))
    monkeypatch.setattr(token_map, "DENSE_LIMIT", 0)
    sparse = token2map(tokens, index, grid, size), map2token(fmap, index, grid, M)
    sparse_grads = torch.autograd.grad(sum(x.square().sum() for x in sparse), (tokens, fmap))
    for a, b in zip(dense + dense_grads, sparse + sparse_grads):
        torch.testing.assert_close(a, b)
