"""SIA, Semantic Information Aggregation (paper Sec. 3.3): cluster, merge, and keep the grid for keys/values."""

import math
from collections.abc import Callable
from dataclasses import dataclass

from timm.layers import trunc_normal_
from torch import Tensor, nn

from ..ops import TokenLayout, cluster_dpc_knn, merge_tokens
from ..spec import Whole
from .attention import KeyValues
from .options import HafaOptions

WIDTH = Whole(low=1)


def init_layer(layer: nn.Module) -> None:
    """PVT's initialisation, for the layers SIA makes itself: linear layers truncated normal (std 0.02),
    convs normal with the fan-out's std, zero biases."""
    if isinstance(layer, nn.Linear):
        trunc_normal_(layer.weight, std=0.02)
    else:
        fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels // layer.groups
        nn.init.normal_(layer.weight, 0, math.sqrt(2.0 / fan_out))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


@dataclass
class SIAOutput:
    """queries: B x M x C merged tokens; layout: their dictionary and stride-2 map size;
    kv: the conv-encoded H/2 x W/2 grid for the first next-stage block (None with cluster_qkv);
    scores: B x N importance scores of the input tokens; cluster_ids: B x N."""

    queries: Tensor
    layout: TokenLayout
    kv: KeyValues | None
    scores: Tensor
    cluster_ids: Tensor


class SIA(nn.Module):
    """Downsampling by clustering: stage-3 tokens (a grid or merged tokens) -> stage-4 queries.

    1. Project to the new width, as TCFormer's token conv: the map downsampled by `proj` (default a
       3x3/s2 conv; a converted model passes its family's own downsampling) and brought back to
       the tokens, plus a token-wise linear without bias (`skip`); normalise.
    2. Score each token's importance with a linear layer.
    3. DPC-KNN into M = ceil(cluster_ratio * N) clusters (no gradient; options.cluster_ratio, knn_k).
    4. Merge each cluster, weighted by the softmax of its scores (Eq. 5): the queries.
    5. Keys/values keep the spatial layout (Eq. 6, the authors' implicit positional encoding): a
       token-wise linear to the new width without bias (`kv_proj`), a depthwise 5x5/s2 conv on the
       map (`kv_dwconv`), a 1x1 conv (`kv_pwconv`), plus the `proj` map of step 1, normalised by a
       LayerNorm of their own (`kv_norm`): the H/2 x W/2 grid as tokens.
    options.cluster_qkv clusters queries, keys and values alike (paper Table 5, first row).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        proj: nn.Module | None = None,
        options: HafaOptions = HafaOptions(),
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        norm: nn.Module | None = None,
    ):
        """proj: the map's downsampling (B x in_dim x H x W -> B x out_dim x H/2 x W/2), default a
        3x3/s2 conv; norm: the tokens' norm after it, default norm_layer(out_dim)."""
        super().__init__()
        WIDTH.check(in_dim, "SIA in_dim")
        WIDTH.check(out_dim, "SIA out_dim")
        if not isinstance(options, HafaOptions):
            raise ValueError(f"SIA: options must be a hafa.HafaOptions, got {type(options).__name__}")
        self.options = options
        # B x Cin x H x W -> B x Cout x ceil(H/2) x ceil(W/2)
        self.proj = proj if proj is not None else nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.skip = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = norm if norm is not None else norm_layer(out_dim)
        # No bias: the softmax inside each cluster ignores a constant shift, so a bias would get only
        # rounding noise as gradient (which Adam would then amplify).
        self.score = nn.Linear(out_dim, 1, bias=False)
        if not options.cluster_qkv:
            self.kv_proj = nn.Linear(in_dim, out_dim, bias=False)
            self.kv_dwconv = nn.Conv2d(out_dim, out_dim, kernel_size=5, stride=2, padding=2, groups=out_dim)
            self.kv_pwconv = nn.Conv2d(out_dim, out_dim, kernel_size=1)
            self.kv_norm = norm_layer(out_dim)
        own_layers = [self.skip, self.score]
        if proj is None:
            own_layers.append(self.proj)
        if not options.cluster_qkv:
            own_layers += [self.kv_proj, self.kv_dwconv, self.kv_pwconv]
        for layer in own_layers:
            init_layer(layer)

    def forward(self, x: Tensor, layout: TokenLayout, mask: Tensor | None = None) -> SIAOutput:
        """x: B x N x Cin tokens with their layout (a TokenLayout: TokenLayout((H, W)) for a grid); mask:
        B x N, True for padding (never a centre)."""
        if not isinstance(layout, TokenLayout):
            raise ValueError(
                f"SIA: layout must be a hafa.ops.TokenLayout (TokenLayout((H, W)) for tokens on an H x W grid), "
                f"got {type(layout).__name__} {layout!r}"
            )
        if x.dim() != 3 or x.shape[1] != layout.num_tokens or x.shape[2] != self.skip.in_features:
            raise ValueError(
                f"SIA takes tokens B x {layout.num_tokens} x {self.skip.in_features} (its layout's tokens, "
                f"in_dim channels), got x of shape {tuple(x.shape)}"
            )
        conv_map = self.proj(layout.to_map(x))
        tokens = self.norm(self.skip(x) + layout.to_tokens(conv_map))
        scores = self.score(tokens).squeeze(-1)
        num_clusters = self.options.num_clusters(tokens.shape[1])
        cluster_ids, _ = cluster_dpc_knn(tokens, num_clusters, self.options.knn_k, mask)
        queries = merge_tokens(tokens, cluster_ids, num_clusters, scores)
        new_layout = layout.compose(cluster_ids, num_clusters, conv_map.shape[-2:])
        kv = None
        if not self.options.cluster_qkv:
            kv_map = self.kv_pwconv(self.kv_dwconv(layout.to_map(self.kv_proj(x)))) + conv_map
            kv = (self.kv_norm(kv_map.flatten(2).transpose(1, 2)), TokenLayout(kv_map.shape[-2:]))
        return SIAOutput(queries, new_layout, kv, scores, cluster_ids)
