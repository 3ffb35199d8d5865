import pytest
import torch
import torch.nn.functional as F

from hafa.ops import TokenLayout, cluster_dpc_knn, clustering, map2token, merge_tokens, merge_weights, token2map
from hafa.ops.bounded import bounded_tokens, distance_bound
from reference import dpc_knn_reference, map2token_reference, merge_reference, token2map_reference


def _check_against_reference(x, num_clusters, k, mask=None):
    ids, centres = cluster_dpc_knn(x, num_clusters, k=k, mask=mask)
    for b in range(x.shape[0]):
        ref_ids, ref_centres, _, _ = dpc_knn_reference(x[b], num_clusters, k, None if mask is None else mask[b])
        assert centres[b].tolist() == ref_centres.tolist()
        assert ids[b].tolist() == ref_ids.tolist()


@pytest.mark.parametrize("seed", range(12))
def test_dpc_knn_matches_reference_on_random_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, C = 3, int(torch.randint(2, 40, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    num_clusters = int(torch.randint(1, N + 1, (1,), generator=g))
    k = int(torch.randint(1, 8, (1,), generator=g))
    _check_against_reference(x, num_clusters, k)


@pytest.mark.parametrize("seed", range(12))
def test_dpc_knn_matches_reference_with_tied_densities(seed):
    # Few distinct integer tokens, many duplicates: densities and distances tie exactly.
    g = torch.Generator().manual_seed(100 + seed)
    B, N, C = 2, 30, 4
    palette = torch.randint(-2, 3, (5, C), generator=g).float()
    x = palette[torch.randint(0, 5, (B, N), generator=g)]
    _check_against_reference(x, num_clusters=int(torch.randint(1, N, (1,), generator=g)), k=5)


def test_dpc_knn_matches_reference_with_mask():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 25, 6, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 25, dtype=torch.bool)
    mask[0, 20:] = True
    mask[1, ::3] = True
    mask[2, 2:] = True  # fewer real tokens than clusters: padding fills in token order
    _check_against_reference(x, num_clusters=6, k=5, mask=mask)
    ids, centres = cluster_dpc_knn(x, 6, mask=mask)
    assert not mask[0].gather(0, centres[0]).any()
    assert not mask[1].gather(0, centres[1]).any()


def test_dpc_knn_mask_keeps_padding_out_of_centres_on_a_padded_image():
    # An image padded on the right and bottom with identical (zero) tokens, as in detection batches.
    g = torch.Generator().manual_seed(3)
    grid = torch.zeros(2, 10, 12, 16)
    grid[:, :7, :9] = torch.randn(2, 7, 9, 16, generator=g)
    mask = torch.ones(2, 10, 12, dtype=torch.bool)
    mask[:, :7, :9] = False
    ids, centres = cluster_dpc_knn(grid.flatten(1, 2), 30, mask=mask.flatten(1))
    assert not mask.flatten(1).gather(1, centres).any()


def test_dpc_knn_chunked_rows_give_the_same_result(monkeypatch):
    x = torch.randn(2, 300, 16)
    expected = cluster_dpc_knn(x, 75)
    monkeypatch.setattr(clustering, "_MAX_BLOCK_ELEMENTS", 2 * 300 * 7)  # 7 rows a chunk
    got = cluster_dpc_knn(x, 75)
    assert torch.equal(expected[0], got[0])
    assert torch.equal(expected[1], got[1])


def test_dpc_knn_is_deterministic_and_batch_equivariant():
    x = torch.randn(5, 196, 32)
    ids, centres = cluster_dpc_knn(x, 49)
    for _ in range(3):
        again = cluster_dpc_knn(x, 49)
        assert torch.equal(ids, again[0])
        assert torch.equal(centres, again[1])
    perm = torch.tensor([3, 0, 4, 1, 2])
    p_ids, p_centres = cluster_dpc_knn(x[perm], 49)
    assert torch.equal(p_ids, ids[perm])
    assert torch.equal(p_centres, centres[perm])


@pytest.mark.parametrize(("N", "M", "k"), [(196, 49, 5), (10, 10, 5), (10, 25, 5), (4, 2, 10), (1, 1, 5), (7, 3, 1)])
def test_dpc_knn_invariants(N, M, k):
    x = torch.randn(3, N, 8)
    ids, centres = cluster_dpc_knn(x, M, k=k)
    clusters = min(M, N)
    assert ids.dtype == torch.long
    assert ids.shape == (3, N)
    assert centres.shape == (3, clusters)
    assert ids.min() >= 0
    assert ids.max() < clusters
    assert torch.equal(ids.gather(1, centres), torch.arange(clusters).expand(3, clusters))
    for b in range(3):
        assert torch.bincount(ids[b], minlength=clusters).min() >= 1
        assert torch.equal(centres[b], centres[b].sort().values)


def test_dpc_knn_all_identical_tokens():
    x = torch.ones(2, 50, 16)
    ids, centres = cluster_dpc_knn(x, 12)
    assert centres.tolist() == [list(range(12))] * 2
    for b in range(2):
        assert torch.bincount(ids[b], minlength=12).min() >= 1


def test_dpc_knn_no_gradient_and_any_dtype():
    x = torch.randn(2, 30, 8, requires_grad=True)
    ids, centres = cluster_dpc_knn(x, 8)
    assert not ids.requires_grad
    ids16, _ = cluster_dpc_knn(x.detach().to(torch.bfloat16), 8)
    assert ids16.shape == ids.shape


def test_dpc_knn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B x N x C"):
        cluster_dpc_knn(torch.randn(10, 4), 3)
    with pytest.raises(ValueError, match="at least one image, token and channel"):
        cluster_dpc_knn(torch.randn(1, 0, 4), 3)


def test_dpc_knn_large_features_do_not_underflow_the_density():
    # exp(-mean d^2) underflows to 0 for spread-out tokens; ranking in the log domain keeps the
    # densest token (highest rho, so highest rho * delta) a centre all the same.
    x = torch.randn(2, 40, 4, dtype=torch.float64) * 30
    _, centres = cluster_dpc_knn(x, 10)
    for b in range(2):
        d2 = torch.cdist(x[b], x[b]).pow(2)
        densest = int(d2.topk(5, largest=False).values.mean(-1).argmin())
        assert densest in centres[b].tolist()


def _is_partition(ids, centres, N, M):
    """cluster ids in [0, M), centres ascending in [0, N), each centre its own cluster, no cluster empty."""
    B = ids.shape[0]
    assert ids.shape == (B, N)
    assert centres.shape == (B, M)
    assert int(ids.min()) >= 0
    assert int(ids.max()) < M
    assert int(centres.min()) >= 0
    assert int(centres.max()) < N
    assert torch.equal(ids.gather(1, centres), torch.arange(M).expand(B, M))
    assert torch.equal(centres, centres.sort(dim=1).values)


def test_dpc_knn_on_overflowing_and_non_finite_tokens_gives_a_defined_partition():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 20, 8, generator=g)
    assert torch.equal(bounded_tokens(tokens, 5), tokens)  # what a model clusters is never changed
    huge = tokens * 1e20  # squared distances overflow float32 (the PyTorch path saw inf - inf = nan)
    bounded = bounded_tokens(huge, 5)
    assert torch.isfinite(bounded).all()
    assert bounded.abs().amax() <= distance_bound(torch.float32, 5, 8) * (1 + 1e-6)  # up to float32 rounding
    peak = lambda t: t.abs().amax(dim=(1, 2), keepdim=True)  # noqa: E731
    torch.testing.assert_close(bounded / peak(bounded), tokens / peak(tokens))  # each image only scaled
    nan = tokens.clone()
    nan[0, 3, 1] = float("nan")
    nan[1] = float("nan")  # a whole image
    infinite = tokens.clone()
    infinite[0, 2] = float("inf")
    infinite[1, 5, 0] = -float("inf")
    for x in (huge, nan, infinite, huge.double() * 1e150):
        ids, centres = cluster_dpc_knn(x, 4)
        _is_partition(ids, centres, 20, 4)
        again = cluster_dpc_knn(x, 4)
        assert torch.equal(ids, again[0])
        assert torch.equal(centres, again[1])
    # a NaN token is clustered as a zero token
    zeroed = tokens.clone()
    zeroed[0, 3, 1] = 0.0
    zeroed[1] = 0.0
    for got, want in zip(cluster_dpc_knn(nan, 4), cluster_dpc_knn(zeroed, 4)):
        assert torch.equal(got, want)


def test_merge_tokens_matches_a_loop_over_clusters():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (3, 40), generator=g)
    scores = torch.randn(3, 40, generator=g, dtype=torch.float64)
    for s in (None, scores):
        merged = merge_tokens(x, ids, 9, s)
        for b in range(3):
            ref = merge_reference(x[b], ids[b], 9, None if s is None else s[b])
            torch.testing.assert_close(merged[b], ref)
    weights = merge_weights(ids, 9, scores)
    sums = torch.zeros(3, 9, dtype=weights.dtype).scatter_add(1, ids, weights)
    present = torch.zeros(3, 9).scatter_add(1, ids, torch.ones(3, 40)) > 0
    torch.testing.assert_close(sums[present], torch.ones(int(present.sum())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_tokens_is_stable_with_huge_scores(dtype):
    x = torch.randn(2, 20, 4).to(dtype)
    ids = torch.arange(20).remainder(5).expand(2, 20).contiguous()
    scores = torch.tensor([1e4, -1e4] * 10).expand(2, 20).to(dtype)
    merged = merge_tokens(x, ids, 5, scores)
    assert torch.isfinite(merged).all()
    # cluster c holds tokens c, c+5, c+10, c+15; the +1e4 scores take all the weight
    expected = torch.stack([x[:, [c, c + 10] if c % 2 == 0 else [c + 5, c + 15]].float().mean(1) for c in range(5)], 1)
    torch.testing.assert_close(merged.float(), expected, atol=1e-2, rtol=1e-2)


def test_merge_tokens_gradients_reach_tokens_and_scores():
    x = torch.randn(2, 12, 4, requires_grad=True)
    scores = torch.randn(2, 12, 1, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0]).expand(2, 12)
    merge_tokens(x, ids, 4, scores).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    assert scores.grad.abs().sum() > 0


def test_token2map_and_map2token_are_reshapes_on_the_identity_grid():
    x = torch.randn(2, 6 * 5, 3)
    index = torch.arange(30).expand(2, 30)
    fmap = token2map(x, index, (6, 5), (6, 5))
    assert torch.equal(fmap, x.transpose(1, 2).reshape(2, 3, 6, 5))
    assert torch.equal(map2token(fmap, index, (6, 5), 30), x)
    layout = TokenLayout((6, 5))
    assert torch.equal(layout.to_map(x), fmap)
    assert torch.equal(layout.to_tokens(fmap), x)


def test_token2map_averages_cells_that_share_an_output_pixel():
    # 2 x 4 grid of cells (tokens 0 and 1) painted onto 1 x 2: each pixel averages a 2 x 2 block.
    tokens = torch.tensor([[[0.0], [10.0]]])
    index = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1]])
    fmap = token2map(tokens, index, (2, 4), (1, 2))
    assert fmap.flatten().tolist() == [(0 + 0 + 0 + 10) / 4, 10.0]
    # back: token 0's three cells lie in pixel 0; token 1 has one cell in pixel 0 and four in pixel 1
    back = map2token(fmap, index, (2, 4), 2)
    torch.testing.assert_close(back.flatten(), torch.tensor([2.5, (2.5 + 4 * 10.0) / 5]))


def test_map2token_averages_over_a_tokens_cells():
    fmap = torch.arange(12.0).view(1, 1, 3, 4)
    index = torch.tensor([[0, 0, 1, 1, 0, 2, 2, 1, 3, 3, 3, 3]])
    tokens = map2token(fmap, index, (3, 4), 5)
    torch.testing.assert_close(tokens.flatten(), torch.tensor([(0 + 1 + 4) / 3, (2 + 3 + 7) / 3, 5.5, 9.5, 0.0]))


@pytest.mark.parametrize(
    ("grid", "out"), [((7, 9), (4, 5)), ((7, 9), (14, 18)), ((5, 3), (5, 3)), ((1, 1), (1, 1)), ((13, 2), (3, 7))]
)
def test_dictionary_resizes_like_adaptive_average_pooling(grid, out):
    x = torch.randn(2, grid[0] * grid[1], 5)
    index = torch.arange(grid[0] * grid[1]).expand(2, -1)
    fmap = token2map(x, index, grid, out)
    plain = x.transpose(1, 2).reshape(2, 5, *grid)
    torch.testing.assert_close(fmap, F.adaptive_avg_pool2d(plain, out))
    torch.testing.assert_close(
        map2token(fmap, index, grid, grid[0] * grid[1]), F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)
    )


@pytest.mark.parametrize(
    ("grid", "size"), [((7, 9), (4, 5)), ((7, 9), (7, 9)), ((5, 6), (11, 13)), ((8, 8), (3, 8)), ((50, 84), (25, 42))]
)
def test_clustered_dictionary_matches_the_reference_with_gradients(grid, size):
    M = 13 if grid[0] < 50 else 1050
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, M - 1, (2, grid[0] * grid[1]), generator=g)  # token M-1 has no cell
    tokens = torch.randn(2, M, 3, dtype=torch.float64, generator=g, requires_grad=True)
    fmap = torch.randn(2, 3, *size, dtype=torch.float64, generator=g, requires_grad=True)
    ours = token2map(tokens, index, grid, size), map2token(fmap, index, grid, M)
    reference = token2map_reference(tokens, index, grid, size), map2token_reference(fmap, index, grid, M)
    weights = [torch.randn(x.shape, dtype=torch.float64, generator=g) for x in reference]
    for x, y in zip(ours, reference):
        torch.testing.assert_close(x, y)
    assert torch.equal(ours[1][:, M - 1], torch.zeros(2, 3, dtype=torch.float64))
    grads = [
        torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, outputs)), (tokens, fmap))
        for outputs in (ours, reference)
    ]
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)


def test_dictionary_in_bfloat16():
    index = torch.randint(0, 5, (1, 12))
    tokens = torch.randn(1, 5, 4, dtype=torch.bfloat16)
    fmap = token2map(tokens, index, (3, 4), (2, 2))
    assert fmap.dtype == torch.bfloat16
    assert fmap.shape == (1, 4, 2, 2)
    assert map2token(fmap, index, (3, 4), 5).dtype == torch.bfloat16
    torch.testing.assert_close(
        fmap.float(), token2map_reference(tokens.float(), index, (3, 4), (2, 2)), rtol=0.02, atol=0.02
    )


def test_round_trip_through_a_clustered_dictionary():
    # token -> map at the grid size -> token is the identity for any clustering of the grid
    x = torch.randn(2, 63, 8)
    ids, _ = cluster_dpc_knn(x, 16)
    tokens = merge_tokens(x, ids, 16)
    layout = TokenLayout((7, 9)).compose(ids, 16, (4, 5))
    torch.testing.assert_close(
        map2token(token2map(tokens, layout.index, (7, 9), (7, 9)), layout.index, (7, 9), 16), tokens
    )
    # and at the stride-2 map every pixel is an average of tokens
    assert layout.to_map(tokens).shape == (2, 8, 4, 5)
    assert layout.to_tokens(layout.to_map(tokens)).shape == (2, 16, 8)


def test_layout_composes_dictionaries():
    grid = TokenLayout((4, 4))
    first = grid.compose(torch.arange(16).div(2, rounding_mode="floor").expand(1, 16), 8, (2, 2))
    second = first.compose(torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]]), 4, (1, 1))
    assert second.index.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]]
    assert second.grid_size == (4, 4)
    assert second.num_tokens == 4


def test_dictionary_sizes_must_be_whole_numbers():
    tokens, index = torch.randn(1, 3, 4), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"token2map: out_size must be \(H, W\), two whole numbers >= 1, got \(2.0, 2\)"
    ):
        token2map(tokens, index, (2, 2), (2.0, 2))
    with pytest.raises(ValueError, match="grid_size"):
        map2token(torch.randn(1, 4, 2, 2), index, (2.0, 2.0), 3)
