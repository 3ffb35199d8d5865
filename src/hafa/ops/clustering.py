"""DPC-KNN: density peak clustering with k-nearest-neighbour density (paper Eqs. 2-4).

Exact and deterministic, in five steps: neighbours, density, relative distance, centres, assignment.
Only the k-nearest-neighbour search needs all N^2 token pairs; `_PairDistances` serves them either
from one kept B x N x N block (when it fits) or recomputed per row chunk, so memory stays bounded
at detection sizes.

The relative distance delta_i (to the nearest denser token) comes from the neighbour lists: every
token closer than i's k-th neighbour is listed, so if a listed neighbour is denser, the nearest
denser token is listed too. Only local density peaks (no denser neighbour listed) need a scan over
all tokens. On CPU in eager mode only the peaks are scanned (they are few, and counting them costs
nothing there); on a GPU, and while compiling or exporting, every token is scanned so that no shape
depends on the data and the host never waits for the device. Both give the same clusters.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .bounded import bounded_tokens
from .constants import batch_offsets, graph_capture, token_indices
from .kernels import dpc_knn, use_triton

# Row chunks keep one B x rows x N block of distances under this many elements (256 MB in fp32).
_MAX_BLOCK_ELEMENTS = 64 * 1024 * 1024
# On CPU, gathered neighbour features are handled in blocks of this many elements (1 MB in fp32): such
# a block stays in a core's cache between the gather, the subtraction and the sum.
_CACHE_BLOCK_ELEMENTS = 256 * 1024
# Rows of the Gram matrix multiplied at a time when all distances are kept.
_GRAM_BLOCK = 512


def _scans_every_token(x: Tensor) -> bool:
    """Whether the relative distance scans all tokens (fixed shapes, no device-to-host sync)."""
    return x.device.type != "cpu" or graph_capture()


def _over_row_chunks(num_rows: int, row_cost: int, fn: Callable[[slice], Tensor], budget: int | None = None) -> Tensor:
    """fn over slices of rows, each costing at most `budget` elements (_MAX_BLOCK_ELEMENTS by default),
    concatenated along dim 1 (the rows of a B x rows x ... result).

    One chunk while exporting: the graph then holds no loop whose length depends on the batch size.
    """
    if torch.compiler.is_exporting():
        return fn(slice(0, num_rows))
    step = max(1, (budget or _MAX_BLOCK_ELEMENTS) // max(1, row_cost))
    if step >= num_rows:
        return fn(slice(0, num_rows))
    return torch.cat([fn(slice(start, min(start + step, num_rows))) for start in range(0, num_rows, step)], dim=1)


def _take(values: Tensor, index: Tensor) -> Tensor:
    """values[b, index[b, ...]] for values B x N x C and index B x ...: B x ... x C."""
    B, N, C = values.shape
    offsets = batch_offsets(B, N, index.device).view(-1, *[1] * (index.dim() - 1))
    return values.reshape(B * N, C).index_select(0, (index + offsets).flatten()).view(*index.shape, C)


def _shifted_distances(rows: Tensor, columns: Tensor, columns_sq: Tensor) -> Tensor:
    """|b|^2 - 2 a.b for rows a (B x R x C) and columns b (B x M x C, squared norms B x M): B x R x M."""
    return torch.baddbmm(columns_sq[:, None, :], rows, columns.transpose(1, 2), alpha=-2)


def _all_shifted_distances(x: Tensor, sq: Tensor, block: int = _GRAM_BLOCK) -> Tensor:
    """|x_j|^2 - 2 x_i.x_j for all pairs, B x N x N (sq: B x N squared norms). Above `block` tokens with
    half the products: the Gram matrix x x^T is symmetric, so only its blocks on and above the diagonal
    are multiplied."""
    B, N, _ = x.shape
    if block >= N:
        return _shifted_distances(x, x, sq)
    gram = x.new_empty(B, N, N)
    for start in range(0, N, block):
        stop = min(start + block, N)
        upper = torch.bmm(x[:, start:stop], x[:, start:].transpose(1, 2))
        gram[:, start:stop, start:] = upper
        gram[:, stop:, start:stop] = upper[:, :, stop - start :].transpose(1, 2)
    return gram.mul_(-2).add_(sq[:, None, :])


class _PairDistances:
    """Squared distances between tokens x (B x N x C).

    `rows`, `rows_of` and `to` give |x_j|^2 - 2 x_i.x_j: the squared distance less |x_i|^2, a
    constant per row, which orders each row correctly and costs one matmul. `exact` recomputes
    chosen pairs elementwise, so that d(i, j) == d(j, i) bit for bit, d(i, i) == 0 and equal
    densities tie exactly. All B x N x N shifted distances are kept when they fit in one block
    (always while exporting), else each request multiplies again.
    """

    def __init__(self, x: Tensor):
        self.x = x
        self.sq = x.square().sum(-1)
        B, N, _ = x.shape
        keep = torch.compiler.is_exporting() or B * N * N <= _MAX_BLOCK_ELEMENTS
        self.kept = _all_shifted_distances(x, self.sq) if keep else None

    def rows(self, rows: slice) -> Tensor:
        """Rows `rows` against all tokens: B x R x N."""
        if self.kept is not None:
            return self.kept[:, rows]
        return _shifted_distances(self.x[:, rows], self.x, self.sq)

    def rows_of(self, tokens: Tensor) -> Tensor:
        """Tokens (indices, B x R) against all tokens: B x R x N."""
        if self.kept is not None:
            return self.kept.gather(1, tokens[:, :, None].expand(-1, -1, self.kept.shape[2]))
        return _shifted_distances(_take(self.x, tokens), self.x, self.sq)

    def to(self, rows: slice, columns: Tensor) -> Tensor:
        """Rows `rows` against the tokens `columns` (indices, B x M): B x R x M."""
        if self.kept is not None:
            kept = self.kept[:, rows]
            return kept.gather(2, columns[:, None, :].expand(-1, kept.shape[1], -1))
        return _shifted_distances(self.x[:, rows], _take(self.x, columns), self.sq.gather(1, columns))

    def exact(self, anchors: slice | Tensor, others: Tensor) -> Tensor:
        """|x_i - x_j|^2 for anchors i (a slice of all tokens, or indices B x R) and others j (indices,
        B x R x K): B x R x K."""
        B, _, C = self.x.shape
        anchor_x = self.x[:, anchors] if isinstance(anchors, slice) else _take(self.x, anchors)

        def block(rows: slice) -> Tensor:
            return _take(self.x, others[:, rows]).sub_(anchor_x[:, rows, None]).square_().sum(-1)

        budget = _CACHE_BLOCK_ELEMENTS if self.x.device.type == "cpu" else None  # a GPU wants few, large blocks
        return _over_row_chunks(others.shape[1], B * others.shape[2] * C, block, budget)


def _nearest_neighbours(distances: _PairDistances, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The k nearest tokens of every token (itself included; padding is nobody's neighbour).

    Returns their exact squared distances (inf for padding) and indices, B x N x k each.
    """
    B, N, _ = distances.x.shape

    def neighbours(rows: slice) -> Tensor:
        d2 = distances.rows(rows)
        if mask is not None:
            d2 = d2.masked_fill(mask[:, None, :], math.inf)
        return torch.topk(d2, k, dim=-1, largest=False, sorted=True).indices

    knn_idx = _over_row_chunks(N, B * N, neighbours)
    knn_d2 = distances.exact(slice(None), knn_idx)
    if mask is not None:
        knn_d2.masked_fill_(mask.gather(1, knn_idx.flatten(1)).view_as(knn_idx), math.inf)
    return knn_d2, knn_idx


def _density_rank(knn_d2: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Density as the mean squared neighbour distance (rho = exp(-mean / C): lower is denser), B x N,
    and each token's rank by density, B x N (0 is the densest; equal densities rank by index)."""
    if mask is None:
        mean_d2 = knn_d2.mean(-1)
    else:
        finite = torch.isfinite(knn_d2)
        mean_d2 = torch.where(finite, knn_d2, 0).sum(-1) / finite.sum(-1).clamp(min=1)
        mean_d2 = mean_d2.masked_fill(mask, math.inf)
    B, N = mean_d2.shape
    order = torch.sort(mean_d2, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, token_indices(N, order.device).expand(B, N))
    return mean_d2, rank


def _relative_distance(
    distances: _PairDistances, knn_d2: Tensor, knn_idx: Tensor, rank: Tensor, mask: Tensor | None
) -> Tensor:
    """delta^2: squared distance to the nearest denser token, or to the farthest token for the
    densest one, B x N."""
    B, N, _ = distances.x.shape
    not_denser = rank.gather(1, knn_idx.flatten(1)).view_as(knn_idx) >= rank[:, :, None]
    delta2 = knn_d2.masked_fill(not_denser, math.inf).amin(-1)
    is_peak = not_denser.all(-1)
    if mask is not None:
        is_peak &= ~mask

    if _scans_every_token(distances.x):
        scanned, scanned_rank = slice(None), rank
    else:
        num_peaks = int(is_peak.sum(-1).max())
        if num_peaks == 0:
            return delta2
        scanned = torch.sort(is_peak.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :num_peaks]
        scanned_rank = rank.gather(1, scanned)

    def nearest_denser_or_farthest(rows: slice) -> Tensor:
        if isinstance(scanned, slice):
            d2 = distances.rows(rows)
        else:
            d2 = distances.rows_of(scanned[:, rows])
        not_lower = rank[:, None, :] >= scanned_rank[:, rows, None]
        if mask is not None:
            not_lower |= mask[:, None, :]
        farthest = (d2 if mask is None else d2.masked_fill(mask[:, None, :], -math.inf)).argmax(-1)
        nearest_denser = d2.masked_fill(not_lower, math.inf).argmin(-1)
        return torch.where(not_lower.all(-1), farthest, nearest_denser)

    partner = _over_row_chunks(scanned_rank.shape[1], B * N, nearest_denser_or_farthest)
    scanned_delta2 = distances.exact(scanned, partner[:, :, None]).squeeze(-1)
    if isinstance(scanned, slice):
        return torch.where(is_peak, scanned_delta2, delta2)
    return delta2.scatter(
        1, scanned, torch.where(is_peak.gather(1, scanned), scanned_delta2, delta2.gather(1, scanned))
    )


def _select_centres(mean_d2: Tensor, delta2: Tensor, num_clusters: int, mask: Tensor | None) -> Tensor:
    """The num_clusters tokens of highest rho * delta, B x M ascending (ties: lower index; padding
    last). mean_d2 and delta2 are scaled by 1/C; rho * delta is compared as its logarithm, so
    nothing underflows."""
    log_score = 0.5 * torch.log(delta2) - mean_d2
    if mask is not None:
        log_score = log_score.masked_fill(mask, -math.inf)
    by_score = torch.sort(log_score, dim=-1, descending=True, stable=True).indices
    if mask is not None:
        by_score = by_score.gather(1, torch.sort(mask.gather(1, by_score).to(torch.uint8), dim=-1, stable=True).indices)
    return torch.sort(by_score[:, :num_clusters], dim=-1).values


def _assign_to_centres(distances: _PairDistances, centres: Tensor) -> Tensor:
    """Every token joins its nearest centre (ties: lower cluster id); every centre is its own cluster."""
    B, N, _ = distances.x.shape
    M = centres.shape[1]
    cluster_ids = _over_row_chunks(N, B * M, lambda rows: distances.to(rows, centres).argmin(-1))
    return cluster_ids.scatter_(1, centres, token_indices(M, centres.device).expand(B, M))


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

    Runs in float32 (float64 inputs in float64), whatever autocast is active. With use_kernels("triton")
    (or "auto" where measured faster) float32 tokens go through the fused Triton op hafa::dpc_knn, which
    gives the same clusters.

    Tokens whose squared distances would overflow, and NaN or infinite tokens, are clustered as
    hafa.ops.bounded.bounded_tokens makes them (NaN as 0, an image beyond the largest magnitude that
    cannot overflow scaled down to it), on both paths alike: a defined partition with every index in
    range, not an error (checking would make the host wait for the GPU). Tokens a model normalises
    before clustering are never changed by it.

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
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"cluster_dpc_knn: x must be floating-point tokens B x N x C, got {x.dtype} {tuple(x.shape)}")
    B, N, C = x.shape
    if B == 0 or N == 0 or C == 0:
        raise ValueError(f"cluster_dpc_knn: x must hold at least one image, token and channel, got {tuple(x.shape)}")
    for name, value in (("num_clusters", num_clusters), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 1:
            raise ValueError(f"cluster_dpc_knn: {name} must be a whole number >= 1, got {value!r}")
    num_clusters, k = min(num_clusters, N), min(k, N)
    if mask is not None and (
        mask.dtype != torch.bool
        or mask.shape[-1:] != (N,)
        or mask.dim() > 2
        or (mask.dim() == 2 and mask.shape[0] != B and mask.shape[0] != 1)
    ):
        raise ValueError(
            f"cluster_dpc_knn: mask must be bool B x N = {B} x {N} (or N, for every image), True for padding; got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if mask is not None:
        mask = mask.to(device=x.device).expand(B, N)
    if use_triton("dpc_knn", x, N):
        return dpc_knn(x, num_clusters, k, mask)  # the op bounds the tokens itself
    with torch.autocast(device_type=x.device.type, enabled=False):
        distances = _PairDistances(bounded_tokens(x, k))
        knn_d2, knn_idx = _nearest_neighbours(distances, k, mask)
        mean_d2, rank = _density_rank(knn_d2, mask)
        delta2 = _relative_distance(distances, knn_d2, knn_idx, rank, mask)
        centres = _select_centres(mean_d2 / C, delta2 / C, num_clusters, mask)
        return _assign_to_centres(distances, centres), centres
