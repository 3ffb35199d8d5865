"""The dictionary of paper Fig. 3: between merged tokens and feature maps.

A dictionary is an index, B x (H*W), saying which token each cell of an H x W grid went into.
Maps of another size than the grid are related to it by adaptive average pooling along each axis
(output pixel o covers cells floor(o*H/Ho) .. ceil((o+1)*H/Ho) - 1). Both directions are weighted
sums of rows, one `embedding_bag` each: a pixel is the bag of the tokens under its cells, a token
the bag of the pixels over its cells. Nothing of size pixels x tokens is ever built and nothing
pixels x taps x channels is written out (docs/benchmarks.md compares it with dense averaging
matrices); it runs in any dtype, and exports (ONNX: a Loop over the bags).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import batch_offsets, graph_capture, shape_constant

Size = tuple[int, int]


def _pooling_taps(size_in: int, size_out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """1-D adaptive average pooling as taps: size_out x T input cells and their weights (0 on unused taps)."""
    out = torch.arange(size_out, device=device)
    start = torch.div(out * size_in, size_out, rounding_mode="floor")
    end = torch.div((out + 1) * size_in + size_out - 1, size_out, rounding_mode="floor")
    taps = max(((o + 1) * size_in + size_out - 1) // size_out - o * size_in // size_out for o in range(size_out))
    cells = start[:, None] + torch.arange(taps, device=device)
    used = cells < end[:, None]
    return torch.where(used, cells, start[:, None]), used.double() / (end - start)[:, None]


def _pooling_taps_2d(size_in: Size, size_out: Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """2-D adaptive average pooling as taps: (Ho*Wo) x T raster cells of size_in and their weights."""

    def build() -> tuple[Tensor, Tensor]:
        rows, row_weights = _pooling_taps(size_in[0], size_out[0], device)
        cols, col_weights = _pooling_taps(size_in[1], size_out[1], device)
        cells = rows[:, None, :, None] * size_in[1] + cols[None, :, None, :]
        weights = row_weights[:, None, :, None] * col_weights[None, :, None, :]
        num_pixels = size_out[0] * size_out[1]
        return cells.reshape(num_pixels, -1), weights.reshape(num_pixels, -1)

    return shape_constant(("pooling_taps_2d", tuple(size_in), tuple(size_out)), device, build)


def _pooling_matrix(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """size_out x size_in matrix of 1-D adaptive average pooling (each row sums to 1)."""

    def build() -> Tensor:
        cells, weights = _pooling_taps(size_in, size_out, like.device)
        matrix = torch.zeros(size_out, size_in, device=like.device, dtype=torch.float64)
        return matrix.scatter_add_(1, cells, weights.double()).to(like.dtype)

    return shape_constant(("pooling_matrix", size_in, size_out, like.dtype), like.device, build)


def _resize_axis(feature_map: Tensor, dim: int, size: int) -> Tensor:
    """Adaptive average pooling of one axis (2 or 3 of B x C x H x W) to `size`: a whole-number
    upsampling repeats each cell, a whole-number downsampling averages blocks (what the pooling computes
    there, in one copy that a compiler fuses), any other ratio multiplies by the pooling matrix."""
    size_in = feature_map.shape[dim]
    if size == size_in:
        return feature_map
    if size % size_in == 0:
        repeated = feature_map.unsqueeze(dim + 1)
        shape = list(repeated.shape)
        shape[dim + 1] = size // size_in
        return repeated.expand(shape).flatten(dim, dim + 1)
    if size_in % size == 0:
        return feature_map.unflatten(dim, (size, size_in // size)).mean(dim + 1)
    matrix = _pooling_matrix(size_in, size, feature_map)
    return torch.matmul(feature_map, matrix.t()) if dim == 3 else torch.matmul(matrix, feature_map)


def resize_map(feature_map: Tensor, size: Size) -> Tensor:
    """Adaptive average pooling of B x C x H x W to B x C x size, as exportable tensor operations."""
    return _resize_axis(_resize_axis(feature_map, 2, size[0]), 3, size[1])


# How to paint B x M tokens onto a map: (B*P) x T token rows (P output pixels, T cells each) and their
# weights. How to read a map back into tokens: its pixel rows in bags, where each bag starts, the weights.
PaintPlan = tuple[Tensor, Tensor]
ReadPlan = tuple[Tensor, Tensor, Tensor]


def _paint_plan(index: Tensor, grid_size: Size, out_size: Size, num_tokens: int, dtype: torch.dtype) -> PaintPlan:
    B = index.shape[0]
    cells, weights = _pooling_taps_2d(grid_size, out_size, index.device)
    token_rows = index.index_select(1, cells.flatten()) + batch_offsets(B, num_tokens, index.device)
    return token_rows.view(-1, cells.shape[1]), weights.to(dtype).repeat(B, 1)


def _paint(tokens: Tensor, plan: PaintPlan, out_size: Size) -> Tensor:
    B, M, C = tokens.shape
    token_rows, weights = plan
    painted = F.embedding_bag(token_rows, tokens.reshape(B * M, C), mode="sum", per_sample_weights=weights)
    return painted.view(B, -1, C).transpose(1, 2).view(B, C, *out_size)


def _read_plan(index: Tensor, grid_size: Size, map_size: Size, num_tokens: int, dtype: torch.dtype) -> ReadPlan:
    B = index.shape[0]
    pixels, weights = _pooling_taps_2d(map_size, grid_size, index.device)
    # Bags must be consecutive: the cells in token order, each token's bag starting at its first cell.
    order = index.argsort(dim=1, stable=True)
    cells_per_token = torch.zeros(B, num_tokens, dtype=torch.long, device=index.device).scatter_add_(
        1, index, torch.ones_like(index)
    )
    first_cell = cells_per_token.cumsum(1) - cells_per_token + batch_offsets(B, index.shape[1], index.device)
    pixel_rows = pixels[order] + batch_offsets(B, map_size[0] * map_size[1], index.device)[:, :, None]
    shares = weights[order] / cells_per_token.gather(1, index.gather(1, order))[:, :, None]
    return pixel_rows.flatten(), first_cell.flatten() * pixels.shape[1], shares.flatten().to(dtype)


def _read(feature_map: Tensor, plan: ReadPlan, num_tokens: int) -> Tensor:
    B, C, Hm, Wm = feature_map.shape
    pixel_rows, bag_starts, shares = plan
    rows = feature_map.flatten(2).transpose(1, 2).reshape(B * Hm * Wm, C)
    tokens = F.embedding_bag(pixel_rows, rows, bag_starts, mode="sum", per_sample_weights=shares)
    return tokens.view(B, num_tokens, C)


def _whole_numbers(size: Size) -> bool:
    return all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) for s in size)


def _check_dictionary(function: str, index: Tensor, grid_size: Size, batch: int, size: Size, size_name: str) -> None:
    """Shapes and types of a dictionary call (no device synchronisation: the index values are not read)."""
    if index.dim() != 2 or index.dtype != torch.long or index.shape[0] != batch:
        raise ValueError(
            f"{function}: index must be long B x (H*W) with B = {batch}, got {index.dtype} {tuple(index.shape)}"
        )
    if (
        len(grid_size) != 2
        or not _whole_numbers(grid_size)
        or min(grid_size) < 1
        or grid_size[0] * grid_size[1] != index.shape[1]
    ):
        raise ValueError(
            f"{function}: grid_size {tuple(grid_size)} must be (H, W) >= 1 with H*W = "
            f"{index.shape[1]} cells, as the index has"
        )
    if len(size) != 2 or not _whole_numbers(size) or min(size) < 1:
        raise ValueError(f"{function}: {size_name} must be (H, W), two whole numbers >= 1, got {tuple(size)}")


def token2map(tokens: Tensor, index: Tensor, grid_size: Size, out_size: Size) -> Tensor:
    """Paint tokens onto a feature map through the dictionary.

    Args:
        tokens: B x M x C.
        index: B x (H*W) long, the token of every cell of the H x W grid (raster order). Its values are not
            checked (that would make the host wait for a GPU): one >= M is an index error on a CPU and
            undefined on a GPU.
        grid_size: (H, W).
        out_size: (Ho, Wo) of the map to make; an output pixel covering several cells averages them.

    Returns:
        B x C x Ho x Wo (channels-last memory layout).
    """
    if tokens.dim() != 3 or not tokens.is_floating_point():
        raise ValueError(
            f"token2map: tokens must be floating-point B x M x C, got {tokens.dtype} {tuple(tokens.shape)}"
        )
    _check_dictionary("token2map", index, grid_size, tokens.shape[0], out_size, "out_size")
    plan = _paint_plan(index, grid_size, out_size, tokens.shape[1], tokens.dtype)
    return _paint(tokens, plan, out_size)


def map2token(feature_map: Tensor, index: Tensor, grid_size: Size, num_tokens: int) -> Tensor:
    """Average a feature map back over each token's cells.

    Args:
        feature_map: B x C x Hm x Wm, any size (brought to the grid by adaptive average pooling).
        index: B x (H*W) long, as in token2map.
        grid_size: (H, W).
        num_tokens: M.

    Returns:
        B x M x C (a token with no cell gets zeros).
    """
    if feature_map.dim() != 4 or not feature_map.is_floating_point():
        raise ValueError(
            f"map2token: feature_map must be floating-point B x C x H x W, got {feature_map.dtype} "
            f"{tuple(feature_map.shape)}"
        )
    _check_dictionary("map2token", index, grid_size, feature_map.shape[0], feature_map.shape[-2:], "the map's size")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"map2token: num_tokens must be a whole number >= 1, got {num_tokens!r}")
    plan = _read_plan(index, grid_size, feature_map.shape[-2:], num_tokens, feature_map.dtype)
    return _read(feature_map, plan, num_tokens)


@dataclass
class TokenLayout:
    """Where a stage's tokens are: a plain grid in raster order, or clusters recorded in a dictionary.

    map_size: (H, W) of the feature map the stage stands for (stride 4, 8, 16 or 32).
    index: None for a plain grid (tokens are the map's pixels), else B x (Hg*Wg), the token of each
        cell of the dictionary grid.
    grid_size: (Hg, Wg) of the dictionary grid (the grid on which the first clustering ran).
    num_tokens: number of tokens N.
    """

    map_size: Size
    index: Tensor | None = None
    grid_size: Size | None = None
    num_tokens: int | None = None
    # Paint and read plans of a clustered layout, made once for every block that uses the layout.
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        size = self.map_size
        if not (
            isinstance(size, (tuple, list, torch.Size))
            and len(size) == 2
            and all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) and s >= 1 for s in size)
        ):
            raise ValueError(f"TokenLayout: map_size must be (H, W), two whole numbers >= 1, got {size!r}")
        self.map_size = tuple(int(s) for s in self.map_size)
        if self.index is None:
            self.grid_size = self.map_size
            self.num_tokens = self.map_size[0] * self.map_size[1]
        elif self.grid_size is None or self.num_tokens is None:
            raise ValueError("a clustered TokenLayout needs grid_size and num_tokens")

    @property
    def is_grid(self) -> bool:
        return self.index is None

    def to_map(self, tokens: Tensor, size: Size | None = None) -> Tensor:
        """B x N x C tokens -> B x C x H x W (H, W = size or map_size)."""
        size = tuple(size or self.map_size)
        if self.index is None:
            B, _, C = tokens.shape
            return resize_map(tokens.transpose(1, 2).reshape(B, C, *self.map_size), size)
        plan = self._plan("paint", size, tokens.dtype, _paint_plan)
        return _paint(tokens, plan, size)

    def to_tokens(self, feature_map: Tensor) -> Tensor:
        """B x C x Hm x Wm map of any size -> B x N x C tokens."""
        if self.index is None:
            return resize_map(feature_map, self.map_size).flatten(2).transpose(1, 2)
        plan = self._plan("read", tuple(feature_map.shape[-2:]), feature_map.dtype, _read_plan)
        return _read(feature_map, plan, self.num_tokens)

    def _plan(self, kind: str, size: Size, dtype: torch.dtype, make: Callable):
        """make(index, grid_size, size, num_tokens, dtype), kept for later calls (not while capturing a graph)."""
        key = (kind, size, dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = make(self.index, self.grid_size, size, self.num_tokens, dtype)
            if not graph_capture():
                self._plans[key] = plan
        return plan

    def compose(self, cluster_ids: Tensor, num_clusters: int, map_size: Size) -> "TokenLayout":
        """The layout after these tokens were clustered (cluster_ids: B x N) into a map of map_size."""
        index = cluster_ids if self.index is None else cluster_ids.gather(1, self.index)
        return TokenLayout(map_size, index, self.grid_size, num_clusters)
