"""DPC-KNN: density peak clustering with k-nearest-neighbour density (paper Eqs. 2-4).

Exact and deterministic. Only the k-nearest-neighbour search looks at all N^2 token pairs, and it does
so in row chunks so that memory stays bounded at detection sizes. The relative distance delta_i (distance
to the nearest denser token) comes from the neighbour lists: every token closer than i's k-th neighbour
is in the list, so if any listed neighbour is denser, the nearest denser token is listed too. Only the
local density peaks (no denser neighbour listed) need a scan over all tokens, and they are few.
When all B x N x N distances fit in one block (classification, and detection at batch 2) they are
computed once, from half the products of the symmetric Gram matrix, and the peaks' scan and the
assignment to centres read them instead of multiplying again.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Row chunks keep one B x rows x N block of distances under this many elements (256 MB in fp32).
_MAX_BLOCK_ELEMENTS = 64 * 1024 * 1024
# Gathered neighbour features are handled in blocks of this many elements (1 MB in fp32), which stay
# in a core's cache between the gather, the subtraction and the sum: 5x faster than one pass over all
# of them at 224 x 224, batch 32 (larger blocks fall out of the cache and lose most of the gain).
_CACHE_BLOCK_ELEMENTS = 256 * 1024
# Rows of the Gram matrix multiplied at a time when all distances are kept (_all_shifted_distances).
_GRAM_BLOCK = 512


def _augmented(x: Tensor) -> tuple[Tensor, Tensor]:
    """[-2x, 1] and [x, |x|^2], B x N x (C+1) each: row i of the first dotted with row j of the second
    is |x_j|^2 - 2 x_i.x_j, the operands of _shifted_distances."""
    left = torch.cat([x * -2, x.new_ones(x.shape[:2] + (1,))], dim=-1)
    right = torch.cat([x, x.pow(2).sum(-1, keepdim=True)], dim=-1)
    return left, right


def _shifted_distances(left: Tensor, right: Tensor) -> Tensor:
    """|b|^2 - 2 a.b for rows a (left operand, B x R x (C+1)) and b (right operand, B x N x (C+1)):
    B x R x N from one batched matmul.

    This is the squared distance minus |a|^2, a constant per row, so row-wise orderings need
    nothing more; it is added to the few values kept.
    """
    return torch.bmm(left, right.transpose(1, 2))


def _all_shifted_distances(x: Tensor, left: Tensor, right: Tensor, block: int = _GRAM_BLOCK) -> Tensor:
    """|x_j|^2 - 2 x_i.x_j for all pairs, B x N x N (x and its _augmented operands). Above `block` tokens
    with half the products: the Gram matrix x x^T is symmetric, so only its blocks on and above the
    diagonal are multiplied and each is mirrored below."""
    B, N, _ = x.shape
    if block >= N:
        return _shifted_distances(left, right)
    gram = x.new_empty(B, N, N)
    for start in range(0, N, block):
        stop = min(start + block, N)
        upper = torch.bmm(x[:, start:stop], x[:, start:].transpose(1, 2))
        gram[:, start:stop, start:] = upper
        gram[:, stop:, start:stop] = upper[:, :, stop - start :].transpose(1, 2)
    return gram.mul_(-2).add_(x.pow(2).sum(-1)[:, None, :])


def _take(values: Tensor, index: Tensor) -> Tensor:
    """values[b, index[b, ...]] for values B x N x C and index B x ...: B x ... x C."""
    B, N, C = values.shape
    offsets = torch.arange(B, device=index.device).mul_(N).view(-1, *[1] * (index.dim() - 1))
    return values.reshape(B * N, C).index_select(0, (index + offsets).flatten()).view(*index.shape, C)


def _over_row_chunks(num_rows: int, row_cost: int, fn: Callable[[slice], Tensor], budget: int | None = None) -> list:
    """fn over slices of rows, each costing at most `budget` elements (_MAX_BLOCK_ELEMENTS by default).

    One chunk while exporting: the graph then holds no loop whose length depends on the batch size.
    """
    if torch.compiler.is_exporting():
        return [fn(slice(0, num_rows))]
    step = max(1, (budget or _MAX_BLOCK_ELEMENTS) // max(1, row_cost))
    return [fn(slice(start, min(start + step, num_rows))) for start in range(0, num_rows, step)]


@torch.compiler.disable(reason="reads the number of density peaks from the data; runs eagerly between compiled graphs")
@torch.no_grad()
def cluster_dpc_knn(
    x: Tensor,
    num_clusters: int,
    k: int = 5,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cluster tokens by density peaks (DPC-KNN). No gradient flows through it.

    Distances are euclidean scaled by 1/sqrt(C). The local density of a token is
    rho_i = exp(-mean of d_ij^2 over its k nearest tokens), the token itself included (as in the
    reference implementations of TCFormer and HAFA). A token is denser than another when its rho is
    higher, or equal with a lower token index: ties never depend on random noise. delta_i is the
    distance to the nearest denser token; the densest token takes its distance to the farthest token,
    which makes it the first centre. The M tokens with the highest rho * delta (ties: lower index) are
    the centres; every other token joins its nearest centre (ties: lower cluster id).

    Args:
        x: tokens, B x N x C.
        num_clusters: wanted number of clusters; M = min(num_clusters, N) clusters are made.
        k: neighbours for the density, capped at N.
        mask: optional B x N bool, True for padding tokens. Padding is nobody's neighbour and
            becomes a centre only when an image has fewer real tokens than clusters.

    Returns:
        cluster_ids: B x N long in [0, M), cluster c being the c-th centre in token order.
        centres: B x M long, the token index of each cluster's centre, ascending.
    """
    if x.dim() != 3:
        raise ValueError(f"cluster_dpc_knn expects tokens of shape B x N x C, got {tuple(x.shape)}")
    B, N, C = x.shape
    if N == 0:
        raise ValueError("cluster_dpc_knn needs at least one token")
    num_clusters = max(1, min(int(num_clusters), N))
    k = max(1, min(int(k), N))
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if mask is not None:
        mask = mask.to(device=x.device, dtype=torch.bool).expand(B, N)
    left, right = _augmented(x)
    flat_x = x.reshape(B * N, C)

    def exact_squared_distances(anchors: Tensor, others: Tensor) -> Tensor:
        """|x_i - x_j|^2 summed elementwise, for anchors i (B x R) and others j (B x R x K), token indices: B x R x K.

        Neighbours are found with the fast matmul form; the distances kept are recomputed this way
        so that d(i, j) == d(j, i) bit for bit and d(i, i) == 0, and equal densities tie exactly.
        """
        offsets = torch.arange(B, device=x.device)[:, None] * N
        anchors, others = (anchors + offsets).flatten(), (others + offsets[:, :, None]).flatten(0, 1)

        def block(rows: slice) -> Tensor:
            diff = flat_x.index_select(0, others[rows].flatten()).view(-1, others.shape[1], C)
            diff -= flat_x.index_select(0, anchors[rows])[:, None]
            return diff.square_().sum(-1)

        distances = _over_row_chunks(anchors.shape[0], others.shape[1] * C, block, _CACHE_BLOCK_ELEMENTS)
        return torch.cat(distances).view(B, -1, others.shape[1])

    # All B x N x N distances are kept when they fit in one block (always while exporting): the peaks'
    # scan and the assignment to centres then read them instead of multiplying again.
    keep_all = torch.compiler.is_exporting() or B * N * N <= _MAX_BLOCK_ELEMENTS
    all_d2 = _all_shifted_distances(x, left, right) if keep_all else None

    def knn_rows(rows: slice) -> tuple[Tensor, Tensor]:
        d2 = all_d2[:, rows] if keep_all else _shifted_distances(left[:, rows], right)
        if mask is not None:
            d2 = d2.masked_fill(mask[:, None, :], math.inf)
        indices = torch.topk(d2, k, dim=-1, largest=False, sorted=True).indices
        exact = exact_squared_distances(torch.arange(N, device=x.device)[rows].expand(B, -1), indices)
        if mask is not None:
            exact.masked_fill_(mask.gather(1, indices.flatten(1)).view_as(indices), math.inf)
        return exact, indices

    chunks = _over_row_chunks(N, B * N + k * C, knn_rows)
    knn_d2 = torch.cat([c[0] for c in chunks], dim=1)
    knn_idx = torch.cat([c[1] for c in chunks], dim=1)

    # Density, as the mean squared neighbour distance: lower is denser (rho = exp(-mean / C)).
    if mask is None:
        mean_d2 = knn_d2.mean(-1)
    else:
        finite = torch.isfinite(knn_d2)
        mean_d2 = torch.where(finite, knn_d2, 0).sum(-1) / finite.sum(-1).clamp(min=1)
        mean_d2 = mean_d2.masked_fill(mask, math.inf)
    # rank 0 is the densest token; equal densities rank by token index.
    order = torch.sort(mean_d2, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=x.device).expand(B, N))

    # delta^2 from the neighbour lists, where a denser neighbour is listed.
    denser = rank.gather(1, knn_idx.flatten(1)).view(B, N, k) < rank[:, :, None]
    delta2 = knn_d2.masked_fill(~denser, math.inf).amin(-1)
    is_peak = ~denser.any(-1)
    if mask is not None:
        is_peak &= ~mask

    # Peaks scan all tokens (B x P x N, P the largest peak count in the batch) for their nearest
    # denser token, or the farthest token for the densest one. While exporting, every token is in the
    # list: a graph's shapes cannot depend on the data, and non-peaks in the list change nothing.
    if torch.compiler.is_exporting():
        peaks = torch.arange(N, device=x.device).expand(B, N)
    else:
        num_peaks = int(is_peak.sum(-1).max())
        peaks = torch.sort(is_peak.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :num_peaks]
    num_peaks = peaks.shape[1]
    if num_peaks > 0:
        peak_rank = rank.gather(1, peaks)

        def peak_rows(rows: slice) -> Tensor:
            if keep_all:
                d2 = all_d2.gather(1, peaks[:, rows, None].expand(-1, -1, N))
            else:
                d2 = _shifted_distances(_take(left, peaks[:, rows]), right)
            lower = rank[:, None, :] < peak_rank[:, rows, None]
            if mask is not None:
                lower &= ~mask[:, None, :]
            farthest = (d2 if mask is None else d2.masked_fill(mask[:, None, :], -math.inf)).argmax(-1)
            nearest_denser = d2.masked_fill_(~lower, math.inf).argmin(-1)
            return torch.where(lower.any(-1), nearest_denser, farthest)

        partner = torch.cat(_over_row_chunks(num_peaks, B * N, peak_rows), dim=1)
        peak_delta2 = exact_squared_distances(peaks, partner[:, :, None]).squeeze(-1)
        peak_delta2 = torch.where(is_peak.gather(1, peaks), peak_delta2, math.inf)
        delta2 = delta2.scatter(1, peaks, torch.minimum(delta2.gather(1, peaks), peak_delta2))

    # Centres: highest rho * delta, compared as log(rho * delta) so that nothing underflows.
    log_score = -mean_d2 / C + 0.5 * torch.log(delta2 / C)
    if mask is not None:
        log_score = log_score.masked_fill(mask, -math.inf)
    by_score = torch.sort(-log_score, dim=-1, stable=True).indices
    if mask is not None:
        by_score = by_score.gather(1, torch.sort(mask.gather(1, by_score).to(torch.uint8), dim=-1, stable=True).indices)
    centres = torch.sort(by_score[:, :num_clusters], dim=-1).values

    # Every token joins its nearest centre; every centre is its own cluster.
    centres_right = None if keep_all else _take(right, centres)

    def nearest_centre(rows: slice) -> Tensor:
        if keep_all:
            d2 = all_d2[:, rows]
            d2 = d2.gather(2, centres[:, None, :].expand(-1, d2.shape[1], -1))
        else:
            d2 = _shifted_distances(left[:, rows], centres_right)
        return d2.argmin(-1)

    cluster_ids = torch.cat(_over_row_chunks(N, B * num_clusters, nearest_centre), dim=1)
    cluster_ids.scatter_(1, centres, torch.arange(num_clusters, device=x.device).expand(B, num_clusters))
    return cluster_ids, centres
