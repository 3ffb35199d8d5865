"""The dictionary of paper Fig. 3: between merged tokens and feature maps.

A dictionary is an index, B x (H*W), saying which token each cell of an H x W grid went into.
Maps of another size than the grid are related to it by adaptive average pooling along each axis
(output pixel o covers cells floor(o*H/Ho) .. ceil((o+1)*H/Ho) - 1). Both directions are weighted
sums of rows, one `embedding_bag` each: a pixel is the bag of the tokens under its cells, a token
the bag of the pixels over its cells. Nothing of size pixels x tokens is ever built and nothing
pixels x taps x channels is written out (docs/benchmarks.md compares it with dense averaging
matrices); it runs in any dtype, and exports (ONNX: a Loop over the bags).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Size = tuple[int, int]


def _pooling_taps(size_in: int, size_out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """1-D adaptive average pooling as taps: size_out x T input cells and their weights (0 on unused taps)."""
    out = torch.arange(size_out, device=device)
    start = torch.div(out * size_in, size_out, rounding_mode="floor")
    end = torch.div((out + 1) * size_in + size_out - 1, size_out, rounding_mode="floor")
    taps = max(((o + 1) * size_in + size_out - 1) // size_out - o * size_in // size_out for o in range(size_out))
    cells = start[:, None] + torch.arange(taps, device=device)
    used = cells < end[:, None]
    return torch.where(used, cells, start[:, None]), used / (end - start)[:, None]


def _pooling_taps_2d(size_in: Size, size_out: Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """2-D adaptive average pooling as taps: (Ho*Wo) x T raster cells of size_in and their weights."""
    rows, row_weights = _pooling_taps(size_in[0], size_out[0], device)
    cols, col_weights = _pooling_taps(size_in[1], size_out[1], device)
    cells = rows[:, None, :, None] * size_in[1] + cols[None, :, None, :]
    weights = row_weights[:, None, :, None] * col_weights[None, :, None, :]
    num_pixels = size_out[0] * size_out[1]
    return cells.reshape(num_pixels, -1), weights.reshape(num_pixels, -1)


def _pooling_matrix(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """size_out x size_in matrix of 1-D adaptive average pooling (each row sums to 1)."""
    cells, weights = _pooling_taps(size_in, size_out, like.device)
    return torch.zeros(size_out, size_in, device=like.device).scatter_add_(1, cells, weights).to(like.dtype)


def resize_map(feature_map: Tensor, size: Size) -> Tensor:
    """Adaptive average pooling of B x C x H x W to B x C x size, as exportable matmuls."""
    H, W = feature_map.shape[-2:]
    if tuple(size) != (H, W):
        if size[0] != H:
            feature_map = torch.matmul(_pooling_matrix(H, size[0], feature_map), feature_map)
        if size[1] != W:
            feature_map = torch.matmul(feature_map, _pooling_matrix(W, size[1], feature_map).t())
    return feature_map


def _batch_offsets(batch: int, rows_per_image: int, device: torch.device) -> Tensor:
    """B x 1: where each image's rows start when the rows of the batch are stacked."""
    return torch.arange(batch, device=device)[:, None] * rows_per_image


def token2map(tokens: Tensor, index: Tensor, grid_size: Size, out_size: Size) -> Tensor:
    """Paint tokens onto a feature map through the dictionary.

    Args:
        tokens: B x M x C.
        index: B x (H*W) long, the token of every cell of the H x W grid (raster order).
        grid_size: (H, W).
        out_size: (Ho, Wo) of the map to make; an output pixel covering several cells averages them.

    Returns:
        B x C x Ho x Wo (channels-last memory layout).
    """
    B, M, C = tokens.shape
    cells, weights = _pooling_taps_2d(grid_size, out_size, index.device)
    token_rows = index.index_select(1, cells.flatten()) + _batch_offsets(B, M, index.device)
    painted = F.embedding_bag(
        token_rows.view(-1, cells.shape[1]),
        tokens.reshape(B * M, C),
        mode="sum",
        per_sample_weights=weights.repeat(B, 1).to(tokens.dtype),
    )
    return painted.view(B, -1, C).transpose(1, 2).view(B, C, *out_size)


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
    B, C, Hm, Wm = feature_map.shape
    pixels, weights = _pooling_taps_2d((Hm, Wm), grid_size, index.device)
    # Bags must be consecutive: the cells in token order, each token's bag starting at its first cell.
    order = index.argsort(dim=1, stable=True)
    cells_per_token = torch.zeros(B, num_tokens, dtype=torch.long, device=index.device).scatter_add_(
        1, index, torch.ones_like(index)
    )
    first_cell = cells_per_token.cumsum(1) - cells_per_token + _batch_offsets(B, index.shape[1], index.device)
    pixel_rows = pixels[order] + _batch_offsets(B, Hm * Wm, index.device)[:, :, None]
    shares = weights[order] / cells_per_token.gather(1, index.gather(1, order))[:, :, None]
    tokens = F.embedding_bag(
        pixel_rows.flatten(),
        feature_map.flatten(2).transpose(1, 2).reshape(B * Hm * Wm, C),
        first_cell.flatten() * pixels.shape[1],
        mode="sum",
        per_sample_weights=shares.flatten().to(feature_map.dtype),
    )
    return tokens.view(B, num_tokens, C)


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

    def __post_init__(self):
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
        return token2map(tokens, self.index, self.grid_size, size)

    def to_tokens(self, feature_map: Tensor) -> Tensor:
        """B x C x Hm x Wm map of any size -> B x N x C tokens."""
        if self.index is None:
            return resize_map(feature_map, self.map_size).flatten(2).transpose(1, 2)
        return map2token(feature_map, self.index, self.grid_size, self.num_tokens)

    def compose(self, cluster_ids: Tensor, num_clusters: int, map_size: Size) -> "TokenLayout":
        """The layout after these tokens were clustered (cluster_ids: B x N) into a map of map_size."""
        index = cluster_ids if self.index is None else cluster_ids.gather(1, self.index)
        return TokenLayout(map_size, index, self.grid_size, num_clusters)
