"""The dictionary of paper Fig. 3: between merged tokens and feature maps.

A dictionary is an index, B x (H*W), saying which token each cell of an H x W grid went into.
Maps of another size than the grid are related to it by adaptive average pooling along each axis
(output pixel o covers cells floor(o*H/Ho) .. ceil((o+1)*H/Ho) - 1). Both directions are one batched
matrix product with a B x (Ho*Wo) x M (or M x (Ho*Wo)) matrix built by a scatter from the index: a
few fast passes instead of a gather, a resize and a scatter over every cell and channel. That matrix
grows with the square of the image area, so where it would exceed DENSE_LIMIT elements per image
(SIA at an early transition on detection-size images) the same averages are taken with a gather and
a scatter over the cells instead. Both ways export and run in any dtype.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

Size = Tuple[int, int]

# Largest (Ho*Wo) x M dictionary matrix per image (16 MB in fp32); beyond it, gather and scatter.
DENSE_LIMIT = 1 << 22


def _pooling_taps(size_in: int, size_out: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """1-D adaptive average pooling as taps: size_out x T input cells and their weights (0 on unused taps)."""
    out = torch.arange(size_out, device=device)
    start = torch.div(out * size_in, size_out, rounding_mode="floor")
    end = torch.div((out + 1) * size_in + size_out - 1, size_out, rounding_mode="floor")
    taps = max(((o + 1) * size_in + size_out - 1) // size_out - o * size_in // size_out for o in range(size_out))
    cells = start[:, None] + torch.arange(taps, device=device)
    used = cells < end[:, None]
    return torch.where(used, cells, start[:, None]), used / (end - start)[:, None]


def _pooling_taps_2d(size_in: Size, size_out: Size, device: torch.device) -> Tuple[Tensor, Tensor]:
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
    if (H, W) != tuple(size):
        if H != size[0]:
            feature_map = torch.matmul(_pooling_matrix(H, size[0], feature_map), feature_map)
        if W != size[1]:
            feature_map = torch.matmul(feature_map, _pooling_matrix(W, size[1], feature_map).t())
    return feature_map


def token2map_matrix(index: Tensor, grid_size: Size, out_size: Size, num_tokens: int) -> Tensor:
    """B x (Ho*Wo) x M float32: the weight of token m in output pixel o (the share of o's cells that went to m)."""
    cells, weights = _pooling_taps_2d(grid_size, out_size, index.device)
    B, (num_pixels, taps) = index.shape[0], cells.shape
    pixel_rows = torch.arange(num_pixels, device=index.device).repeat_interleave(taps) * num_tokens
    position = index.index_select(1, cells.flatten()) + pixel_rows
    matrix = torch.zeros(B, num_pixels * num_tokens, device=index.device)
    return matrix.scatter_add_(1, position, weights.flatten().expand(B, -1)).view(B, num_pixels, num_tokens)


def _cells_per_token(index: Tensor, num_tokens: int) -> Tensor:
    """B x M float32: how many grid cells each token holds (at least 1, so that empty tokens divide safely)."""
    counts = torch.zeros(index.shape[0], num_tokens, device=index.device)
    return counts.scatter_add_(1, index, torch.ones(index.shape, device=index.device)).clamp(min=1)


def map2token_matrix(index: Tensor, grid_size: Size, map_size: Size, num_tokens: int) -> Tensor:
    """B x M x (Hm*Wm) float32: token m is the average over its cells of the map pooled to the grid."""
    pixels, weights = _pooling_taps_2d(map_size, grid_size, index.device)
    B, num_pixels = index.shape[0], map_size[0] * map_size[1]
    position = (index[:, :, None] * num_pixels + pixels).flatten(1)
    sums = torch.zeros(B, num_tokens * num_pixels, device=index.device)
    sums = sums.scatter_add_(1, position, weights.flatten().expand(B, -1)).view(B, num_tokens, num_pixels)
    return sums / _cells_per_token(index, num_tokens)[:, :, None]


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
    num_pixels = out_size[0] * out_size[1]
    if num_pixels * M <= DENSE_LIMIT:
        painted = torch.bmm(token2map_matrix(index, grid_size, out_size, M).to(tokens.dtype), tokens)
    else:
        cells, weights = _pooling_taps_2d(grid_size, out_size, index.device)
        token_of_tap = index.index_select(1, cells.flatten())
        taps = tokens.gather(1, token_of_tap[:, :, None].expand(-1, -1, C)).view(B, num_pixels, -1, C)
        painted = (taps * weights[:, :, None].to(tokens.dtype)).sum(2)
    return painted.transpose(1, 2).view(B, C, *out_size)


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
    pixels = feature_map.flatten(2).transpose(1, 2)
    if Hm * Wm * num_tokens <= DENSE_LIMIT:
        matrix = map2token_matrix(index, grid_size, (Hm, Wm), num_tokens).to(feature_map.dtype)
        return torch.bmm(matrix, pixels)
    taps, weights = _pooling_taps_2d((Hm, Wm), grid_size, index.device)
    cells = pixels.index_select(1, taps.flatten()).view(B, index.shape[1], -1, C)
    cells = (cells * weights[:, :, None].to(feature_map.dtype)).sum(2)
    sums = cells.new_zeros(B, num_tokens, C, dtype=torch.float32)  # many cells per token: sum in fp32
    sums = sums.scatter_add(1, index[:, :, None].expand(-1, -1, C), cells.float())
    return (sums / _cells_per_token(index, num_tokens)[:, :, None]).to(feature_map.dtype)


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
    index: Optional[Tensor] = None
    grid_size: Optional[Size] = None
    num_tokens: Optional[int] = None

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

    def to_map(self, tokens: Tensor, size: Optional[Size] = None) -> Tensor:
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
