"""Triton kernels of hafa::dpc_knn: ops.clustering's decisions from four tiled launches.

Every launch runs one program per (block of rows, image) and recomputes the distances it needs from
x tile by tile; nothing of size N x N is ever stored. Between launches only per-token values travel:
1. neighbours: the k nearest real tokens by |x_j|^2 - 2 x_i.x_j (ties: lower index), their exact squared
   distances sum((x_i - x_j)^2) and the density as their mean (inf for padding);
2. relative distance: from the neighbour lists, and for local density peaks from a scan of every token
   (nearest denser, or farthest for the densest), then the score 0.5 log(delta^2 / C) - mean / C;
3. ranks: each token's place by score (padding last, ties by lower index), the first M kept in order;
4. assignment: every token's nearest centre (ties: lower cluster id), the cluster id of a centre being
   the number of centres of lower index.
All arithmetic is float32; tl.dot runs in IEEE float32 (not TF32).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import on_device

_EMPTY = tl.constexpr(2**31 - 1)  # the index of an empty neighbour slot, or of no token


def dpc_tiles(k: int) -> tuple[int, int, int]:
    """(rows, columns, features) of one tile, with 4 warps: sizes at which ptxas keeps the distance tile, the
    neighbour lists and the dot's operands in registers on sm_90; rows shrink as the k slots per row grow."""
    k_slots = triton.next_power_of_2(k)
    return max(16, min(32, 256 // k_slots)), 32, 16


@triton.jit
def _real(mask_ptr, b, tokens, N, s_mb, s_mn, HAS_MASK: tl.constexpr):
    """Whether tokens (indices) of image b exist and are not padding."""
    real = tokens < N
    if HAS_MASK:
        padding = tl.load(mask_ptr + b * s_mb + tokens * s_mn, mask=real, other=1)
        real = real & (padding == 0)
    return real


@triton.jit
def _shifted_distances(
    x_ptr, image_at, rows, rows_ok, cols, cols_ok, C, s_xn, s_xc,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """|x_j|^2 - 2 x_i.x_j for rows i and cols j (indices): BLOCK_R x BLOCK_J."""
    dot = tl.zeros([BLOCK_R, BLOCK_J], dtype=tl.float32)
    sq = tl.zeros([BLOCK_J], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        a = tl.load(
            x_ptr + image_at + rows[:, None] * s_xn + c[None, :] * s_xc,
            mask=rows_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        bt = tl.load(
            x_ptr + image_at + cols[None, :] * s_xn + c[:, None] * s_xc,
            mask=c_ok[:, None] & cols_ok[None, :],
            other=0.0,
        )
        dot = tl.dot(a, bt, dot, input_precision="ieee")
        sq += tl.sum(bt * bt, axis=0)
    return sq[None, :] - 2.0 * dot


@triton.jit
def _exact_distances(x_ptr, image_at, rows, partners, valid, C, s_xn, s_xc, BLOCK_C: tl.constexpr):
    """sum((x_i - x_j)^2) for rows i and one partner j per row (indices; 0 where not valid)."""
    total = tl.zeros(rows.shape, dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = valid[:, None] & (c < C)[None, :]
        a = tl.load(x_ptr + image_at + rows[:, None] * s_xn + c[None, :] * s_xc, mask=ok, other=0.0)
        p = tl.load(x_ptr + image_at + partners[:, None] * s_xn + c[None, :] * s_xc, mask=ok, other=0.0)
        diff = p - a
        total += tl.sum(diff * diff, axis=1)
    return total


@triton.jit
def _merge_smallest(best_s, best_j, tile_s, tile_j, k, slots):
    """The k smallest (distance, index) pairs of a row's list and a tile, ascending, in the list's shape."""
    merged_s = tl.full(best_s.shape, float("inf"), tl.float32)
    merged_j = tl.full(best_j.shape, _EMPTY, tl.int32)
    for t in range(k):
        smallest = tl.minimum(tl.min(best_s, axis=1), tl.min(tile_s, axis=1))[:, None]
        index = tl.minimum(
            tl.min(tl.where(best_s == smallest, best_j, _EMPTY), axis=1),
            tl.min(tl.where(tile_s == smallest, tile_j, _EMPTY), axis=1),
        )[:, None]
        merged_s = tl.where(slots == t, smallest, merged_s)
        merged_j = tl.where(slots == t, index, merged_j)
        best_s = tl.where(best_j == index, float("inf"), best_s)
        best_j = tl.where(best_j == index, _EMPTY, best_j)
        tile_s = tl.where(tile_j == index, float("inf"), tile_s)
        tile_j = tl.where(tile_j == index, _EMPTY, tile_j)
    return merged_s, merged_j


@triton.jit
def _neighbours_kernel(
    x_ptr, mask_ptr, knn_ptr, knn_d2_ptr, mean_ptr, N, C, k, s_xb, s_xn, s_xc, s_mb, s_mn,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    K_SLOTS: tl.constexpr,
):  # fmt: skip
    """Launch 1: knn (B x N x K_SLOTS, _EMPTY beyond the real neighbours), their exact squared distances
    knn_d2 (inf beyond) and mean (B x N: their mean, inf for padding)."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_ok = rows < N
    image_at = b.to(tl.int64) * s_xb
    slots = tl.arange(0, K_SLOTS)[None, :]
    best_s = tl.full([BLOCK_R, K_SLOTS], float("inf"), tl.float32)
    best_j = tl.full([BLOCK_R, K_SLOTS], _EMPTY, tl.int32)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        cols_real = _real(mask_ptr, b, cols, N, s_mb, s_mn, HAS_MASK)
        s = _shifted_distances(x_ptr, image_at, rows, rows_ok, cols, cols < N, C, s_xn, s_xc, BLOCK_R, BLOCK_J, BLOCK_C)
        tile_s = tl.where(cols_real[None, :], s, float("inf"))
        tile_j = tl.where(cols_real[None, :] & rows_ok[:, None], cols[None, :], _EMPTY)
        best_s, best_j = _merge_smallest(best_s, best_j, tile_s, tile_j, k, slots)

    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    count = tl.zeros([BLOCK_R], dtype=tl.int32)
    knn_d2 = tl.full([BLOCK_R, K_SLOTS], float("inf"), tl.float32)
    for t in range(k):
        partner = tl.max(tl.where(slots == t, best_j, 0), axis=1)
        listed = partner != _EMPTY
        d2 = _exact_distances(x_ptr, image_at, rows, tl.where(listed, partner, 0), listed, C, s_xn, s_xc, BLOCK_C)
        total += tl.where(listed, d2, 0.0)
        count += listed.to(tl.int32)
        knn_d2 = tl.where((slots == t) & listed[:, None], d2[:, None], knn_d2)
    mean = tl.math.div_rn(total, tl.maximum(count, 1).to(tl.float32))
    mean = tl.where(_real(mask_ptr, b, rows, N, s_mb, s_mn, HAS_MASK), mean, float("inf"))

    token_at = b.to(tl.int64) * N + rows
    list_at = token_at[:, None] * K_SLOTS + slots
    tl.store(knn_ptr + list_at, best_j, mask=rows_ok[:, None])
    tl.store(knn_d2_ptr + list_at, knn_d2, mask=rows_ok[:, None])
    tl.store(mean_ptr + token_at, mean, mask=rows_ok)


@triton.jit
def _denser(mean_j, j, mean_i, i):
    """Whether token j is denser than token i: a lower mean squared neighbour distance, or equal and a lower index."""
    return (mean_j < mean_i) | ((mean_j == mean_i) & (j < i))


@triton.jit
def _relative_distance_kernel(
    x_ptr, mask_ptr, knn_ptr, knn_d2_ptr, mean_ptr, score_ptr, N, C, s_xb, s_xn, s_xc, s_mb, s_mn,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    K_SLOTS: tl.constexpr,
):  # fmt: skip
    """Launch 2: score (B x N) = 0.5 log(delta^2 / C) - mean / C, -inf for padding."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_ok = rows < N
    rows_real = _real(mask_ptr, b, rows, N, s_mb, s_mn, HAS_MASK)
    image_at = b.to(tl.int64) * s_xb
    token_at = b.to(tl.int64) * N + rows
    mean_i = tl.load(mean_ptr + token_at, mask=rows_ok, other=float("inf"))

    list_at = token_at[:, None] * K_SLOTS + tl.arange(0, K_SLOTS)[None, :]
    listed_j = tl.load(knn_ptr + list_at, mask=rows_ok[:, None], other=_EMPTY)
    listed_d2 = tl.load(knn_d2_ptr + list_at, mask=rows_ok[:, None], other=float("inf"))
    listed = listed_j != _EMPTY
    listed_mean = tl.load(mean_ptr + b.to(tl.int64) * N + tl.where(listed, listed_j, 0), mask=listed, other=0.0)
    listed_denser = listed & _denser(listed_mean, listed_j, mean_i[:, None], rows[:, None])
    listed_delta2 = tl.min(tl.where(listed_denser, listed_d2, float("inf")), axis=1)
    peak = rows_real & (tl.max(listed_denser.to(tl.int32), axis=1) == 0)

    # Peaks: the nearest denser token over all tokens, or the farthest real token where none is denser.
    nearest_s = tl.full([BLOCK_R], float("inf"), tl.float32)
    nearest_j = tl.full([BLOCK_R], _EMPTY, tl.int32)
    farthest_s = tl.full([BLOCK_R], float("-inf"), tl.float32)
    farthest_j = tl.full([BLOCK_R], _EMPTY, tl.int32)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        cols_real = _real(mask_ptr, b, cols, N, s_mb, s_mn, HAS_MASK)[None, :]
        mean_j = tl.load(mean_ptr + b.to(tl.int64) * N + cols, mask=cols < N, other=float("inf"))
        s = _shifted_distances(x_ptr, image_at, rows, rows_ok, cols, cols < N, C, s_xn, s_xc, BLOCK_R, BLOCK_J, BLOCK_C)
        denser = cols_real & _denser(mean_j[None, :], cols[None, :], mean_i[:, None], rows[:, None])
        tile_min = tl.min(tl.where(denser, s, float("inf")), axis=1)
        tile_nearest = tl.min(tl.where(denser & (s == tile_min[:, None]), cols[None, :], _EMPTY), axis=1)
        closer = tile_min < nearest_s  # tiles come in index order: an equal distance keeps the lower index
        nearest_j = tl.where(closer, tile_nearest, nearest_j)
        nearest_s = tl.where(closer, tile_min, nearest_s)
        tile_max = tl.max(tl.where(cols_real, s, float("-inf")), axis=1)
        tile_farthest = tl.min(tl.where(cols_real & (s == tile_max[:, None]), cols[None, :], _EMPTY), axis=1)
        farther = tile_max > farthest_s
        farthest_j = tl.where(farther, tile_farthest, farthest_j)
        farthest_s = tl.where(farther, tile_max, farthest_s)
    partner = tl.where(nearest_j != _EMPTY, nearest_j, farthest_j)
    scanned = peak & (partner != _EMPTY)
    scanned_delta2 = _exact_distances(
        x_ptr, image_at, rows, tl.where(scanned, partner, 0), scanned, C, s_xn, s_xc, BLOCK_C
    )
    delta2 = tl.where(peak, scanned_delta2, listed_delta2)
    channels = tl.full([BLOCK_R], C, tl.float32)
    score = 0.5 * tl.log(tl.math.div_rn(tl.where(rows_real, delta2, 1.0), channels)) - tl.math.div_rn(
        tl.where(rows_real, mean_i, 0.0), channels
    )  # padding (mean and delta inf) takes -inf below
    tl.store(score_ptr + token_at, tl.where(rows_real, score, float("-inf")), mask=rows_ok)


@triton.jit
def _rank_kernel(
    score_ptr, mask_ptr, order_ptr, N, M, s_mb, s_mn,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Launch 3: order[b, r] (B x M) = the token of rank r by score (real tokens first, ties by lower
    index), for r < M. A token's rank is the number of tokens ahead of it."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_ok = rows < N
    rows_real = _real(mask_ptr, b, rows, N, s_mb, s_mn, HAS_MASK)[:, None]
    score_i = tl.load(score_ptr + b.to(tl.int64) * N + rows, mask=rows_ok, other=float("-inf"))[:, None]
    rank = tl.zeros([BLOCK_R], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        cols_real = _real(mask_ptr, b, cols, N, s_mb, s_mn, HAS_MASK)[None, :]
        score_j = tl.load(score_ptr + b.to(tl.int64) * N + cols, mask=cols < N, other=float("-inf"))[None, :]
        higher = (score_j > score_i) | ((score_j == score_i) & (cols[None, :] < rows[:, None]))
        ahead = (cols[None, :] < N) & ((cols_real & ~rows_real) | ((cols_real == rows_real) & higher))
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    tl.store(order_ptr + b.to(tl.int64) * M + rank, rows, mask=rows_ok & (rank < M))


@triton.jit
def _assign_kernel(
    x_ptr, order_ptr, ids_ptr, centres_ptr, N, C, M, s_xb, s_xn, s_xc,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Launch 4: cluster_ids (B x N) and centres (B x M, ascending) from the M best tokens in `order`."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_ok = rows < N
    image_at = b.to(tl.int64) * s_xb
    order_at = order_ptr + b.to(tl.int64) * M
    nearest_s = tl.full([BLOCK_R], float("inf"), tl.float32)
    nearest = tl.full([BLOCK_R], _EMPTY, tl.int32)
    for t0 in range(0, M, BLOCK_J):
        t_ok = t0 + tl.arange(0, BLOCK_J) < M
        centre = tl.load(order_at + t0 + tl.arange(0, BLOCK_J), mask=t_ok, other=0)
        s = _shifted_distances(x_ptr, image_at, rows, rows_ok, centre, t_ok, C, s_xn, s_xc, BLOCK_R, BLOCK_J, BLOCK_C)
        s = tl.where(t_ok[None, :], s, float("inf"))
        tile_min = tl.min(s, axis=1)
        tile_nearest = tl.min(tl.where(t_ok[None, :] & (s == tile_min[:, None]), centre[None, :], _EMPTY), axis=1)
        # centres come in score order here: an equal distance goes to the lower index (the lower cluster id)
        closer = (tile_min < nearest_s) | ((tile_min == nearest_s) & (tile_nearest < nearest))
        nearest = tl.where(closer, tile_nearest, nearest)
        nearest_s = tl.where(closer, tile_min, nearest_s)
    nearest_id = tl.zeros([BLOCK_R], dtype=tl.int32)
    own_id = tl.zeros([BLOCK_R], dtype=tl.int32)
    is_centre = tl.zeros([BLOCK_R], dtype=tl.int32)
    for t0 in range(0, M, BLOCK_J):
        in_range = t0 + tl.arange(0, BLOCK_J) < M
        centre = tl.load(order_at + t0 + tl.arange(0, BLOCK_J), mask=in_range, other=0)[None, :]
        t_ok = in_range[None, :]
        nearest_id += tl.sum((t_ok & (centre < nearest[:, None])).to(tl.int32), axis=1)
        own_id += tl.sum((t_ok & (centre < rows[:, None])).to(tl.int32), axis=1)
        is_centre += tl.sum((t_ok & (centre == rows[:, None])).to(tl.int32), axis=1)
    token_at = b.to(tl.int64) * N + rows
    tl.store(ids_ptr + token_at, tl.where(is_centre > 0, own_id, nearest_id).to(tl.int64), mask=rows_ok)
    tl.store(centres_ptr + b.to(tl.int64) * M + own_id, rows.to(tl.int64), mask=rows_ok & (is_centre > 0))


def cluster(x: Tensor, num_clusters: int, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """hafa::dpc_knn on float32 tokens x (B x N x C): (cluster_ids B x N, centres B x M), long."""
    B, N, C = x.shape
    M = num_clusters
    block_rows, block_columns, block_features = dpc_tiles(k)
    k_slots = triton.next_power_of_2(k)
    has_mask = mask is not None
    mask_u8 = mask.expand(B, N).view(torch.uint8) if has_mask else x  # x: an unread stand-in pointer
    s_mb, s_mn = mask_u8.stride()[:2] if has_mask else (0, 0)
    knn = torch.empty(B, N, k_slots, dtype=torch.int32, device=x.device)
    knn_d2 = torch.empty(B, N, k_slots, dtype=torch.float32, device=x.device)
    mean = torch.empty(B, N, dtype=torch.float32, device=x.device)
    score = torch.empty(B, N, dtype=torch.float32, device=x.device)
    order = torch.empty(B, M, dtype=torch.int32, device=x.device)
    cluster_ids = torch.empty(B, N, dtype=torch.long, device=x.device)
    centres = torch.empty(B, M, dtype=torch.long, device=x.device)
    if B == 0:
        return cluster_ids, centres
    grid = (triton.cdiv(N, block_rows), B)
    tiles = dict(BLOCK_R=block_rows, BLOCK_J=block_columns)
    with on_device(x):
        _neighbours_kernel[grid](
            x, mask_u8, knn, knn_d2, mean, N, C, k, *x.stride(), s_mb, s_mn,
            HAS_MASK=has_mask, BLOCK_C=block_features, K_SLOTS=k_slots, **tiles,
        )  # fmt: skip
        _relative_distance_kernel[grid](
            x, mask_u8, knn, knn_d2, mean, score, N, C, *x.stride(), s_mb, s_mn,
            HAS_MASK=has_mask, BLOCK_C=block_features, K_SLOTS=k_slots, **tiles,
        )  # fmt: skip
        _rank_kernel[grid](score, mask_u8, order, N, M, s_mb, s_mn, HAS_MASK=has_mask, **tiles)
        _assign_kernel[grid](
            x, order, cluster_ids, centres, N, C, M, *x.stride(), BLOCK_C=block_features, **tiles
        )  # fmt: skip
    return cluster_ids, centres
