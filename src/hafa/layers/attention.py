"""Attention of queries over separate keys/values, and the transformer block built on it.

Both work on tokens with a TokenLayout, so the same block serves a plain grid (a reshape) and
merged tokens after SIA (through the dictionary) wherever a feature map is needed: PVT's spatial
reduction of keys/values and PVT v2's depthwise conv in the MLP. The parts are modules given to the
constructors, so that a converted timm model's blocks keep their own layers (hafa.models.families);
`pvt_block` builds fresh parts for PVT v1. Parameter names follow timm's pvt_v2 (q, kv, sr, norm,
proj; fc1, dwconv, fc2) so baseline checkpoints load by name.
"""

from collections.abc import Callable

import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from ..ops import TokenLayout

KeyValues = tuple[Tensor, TokenLayout]


def _identity_if_none(module: nn.Module | None) -> nn.Module:
    return nn.Identity() if module is None else module


class Attention(nn.Module):
    """Multi-head attention; keys/values from the queries' tokens or from a separate token set.

    q: dim -> dim and kv: dim -> 2 dim projections; sr (with norm): keys/values from the map reduced by
    a strided conv (PVT), or with pool (and act) pooled to a fixed size first (PVT v2-li). scale: of
    the logits, default head_dim ** -0.5.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        q: nn.Module,
        kv: nn.Module,
        proj: nn.Module,
        sr: nn.Module | None = None,
        norm: nn.Module | None = None,
        pool: nn.Module | None = None,
        act: nn.Module | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        scale: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.proj = q, kv, proj
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.scale = scale
        self.sr, self.norm, self.pool, self.act = sr, norm, pool, act

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None = None) -> Tensor:
        """x: B x N x C queries; kv: (B x L x C tokens, their layout), default x itself. -> B x N x C."""
        B, N, C = x.shape
        source, source_layout = kv if kv is not None else (x, layout)
        if self.sr is not None:
            fmap = source_layout.to_map(source)
            if self.pool is not None:
                fmap = self.pool(fmap)
            source = self.norm(self.sr(fmap).flatten(2).transpose(1, 2))
            if self.act is not None:
                source = self.act(source)
        heads = self.num_heads
        q = self.q(x).view(B, N, heads, -1).transpose(1, 2)
        k, v = self.kv(source).view(B, source.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, -1)))


def spatial_reduction_attention(
    dim: int,
    num_heads: int = 8,
    sr_ratio: int = 1,
    linear: bool = False,
    qkv_bias: bool = True,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
) -> Attention:
    """PVT's attention with fresh layers: keys/values reduced by a sr_ratio x sr_ratio strided conv
    (sr_ratio > 1), or (linear=True, PVT v2-li) pooled to 7 x 7 then a 1x1 conv."""
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    reduced = linear or sr_ratio > 1
    sr = None
    if reduced:
        sr = nn.Conv2d(dim, dim, kernel_size=1) if linear else nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
    return Attention(
        num_heads=num_heads,
        q=nn.Linear(dim, dim, bias=qkv_bias),
        kv=nn.Linear(dim, dim * 2, bias=qkv_bias),
        proj=nn.Linear(dim, dim),
        sr=sr,
        norm=nn.LayerNorm(dim) if reduced else None,
        pool=nn.AdaptiveAvgPool2d(7) if linear else None,
        act=nn.GELU() if linear else None,
        attn_drop=attn_drop,
        proj_drop=proj_drop,
    )


class DepthwiseConvMlp(nn.Module):
    """PVT v2's MLP: fc1, (relu), a depthwise conv on the feature map, act, fc2. B x N x C -> B x N x C.
    `depthwise_conv_mlp` builds fresh layers."""

    def __init__(
        self,
        *,
        fc1: nn.Module,
        dwconv: nn.Module,
        fc2: nn.Module,
        relu: nn.Module | None = None,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
    ):
        super().__init__()
        self.fc1, self.dwconv, self.fc2 = fc1, dwconv, fc2
        self.relu, self.drop = _identity_if_none(relu), _identity_if_none(drop)
        self.act = nn.GELU() if act is None else act

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        x = layout.to_tokens(self.dwconv(layout.to_map(self.relu(self.fc1(x)))))
        return self.drop(self.fc2(self.drop(self.act(x))))


def depthwise_conv_mlp(dim: int, hidden_dim: int, drop: float = 0.0, extra_relu: bool = False) -> DepthwiseConvMlp:
    """A DepthwiseConvMlp with fresh layers (PVT v2's MLP): B x N x dim -> B x N x dim."""
    return DepthwiseConvMlp(
        fc1=nn.Linear(dim, hidden_dim),
        dwconv=nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim),
        fc2=nn.Linear(hidden_dim, dim),
        relu=nn.ReLU() if extra_relu else None,
        drop=nn.Dropout(drop),
    )


class Block(nn.Module):
    """A transformer block over tokens with their layout; the first block after SIA attends to separate
    keys/values. Pre-norm, x + attn(norm1(x)) (and the keys/values normalised alike), or post_norm
    (Swin v2), x + norm1(attn(x)); with residual and layer scales as MetaFormer has them,
    res_scale(x) + layer_scale(attn(...)). mlp takes the layout too when it is a DepthwiseConvMlp.
    """

    def __init__(
        self,
        *,
        norm1: nn.Module,
        attn: nn.Module,
        norm2: nn.Module,
        mlp: nn.Module,
        drop_path1: nn.Module | None = None,
        drop_path2: nn.Module | None = None,
        layer_scale1: nn.Module | None = None,
        layer_scale2: nn.Module | None = None,
        res_scale1: nn.Module | None = None,
        res_scale2: nn.Module | None = None,
        post_norm: bool = False,
    ):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.drop_path1, self.drop_path2 = _identity_if_none(drop_path1), _identity_if_none(drop_path2)
        self.layer_scale1, self.layer_scale2 = _identity_if_none(layer_scale1), _identity_if_none(layer_scale2)
        self.res_scale1, self.res_scale2 = _identity_if_none(res_scale1), _identity_if_none(res_scale2)
        self.post_norm = post_norm
        self.mlp_takes_layout = isinstance(mlp, DepthwiseConvMlp)

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None = None) -> Tensor:
        """x: B x N x C with its layout; kv: separate keys/values. -> B x N x C."""
        if self.post_norm:
            y = self.norm1(self.attn(x, layout, kv))
        else:
            if kv is not None:
                kv = (self.norm1(kv[0]), kv[1])
            y = self.attn(self.norm1(x), layout, kv)
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(y))
        y = x if self.post_norm else self.norm2(x)
        y = self.mlp(y, layout) if self.mlp_takes_layout else self.mlp(y)
        if self.post_norm:
            y = self.norm2(y)
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(y))


def pvt_block(
    dim: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    sr_ratio: int = 1,
    linear: bool = False,
    qkv_bias: bool = True,
    proj_drop: float = 0.0,
    attn_drop: float = 0.0,
    drop_path: float = 0.0,
    dwconv_mlp: bool = True,
    norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
) -> Block:
    """A pre-norm PVT block with fresh layers: spatial-reduction attention, then PVT v2's depthwise-conv
    MLP (dwconv_mlp) or timm's plain Mlp (PVT v1)."""
    hidden = int(dim * mlp_ratio)
    return Block(
        norm1=norm_layer(dim),
        attn=spatial_reduction_attention(
            dim,
            num_heads=num_heads,
            sr_ratio=sr_ratio,
            linear=linear,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        ),
        norm2=norm_layer(dim),
        mlp=(
            depthwise_conv_mlp(dim, hidden, drop=proj_drop, extra_relu=linear)
            if dwconv_mlp
            else Mlp(dim, hidden_features=hidden, drop=proj_drop)
        ),
        drop_path1=DropPath(drop_path) if drop_path > 0 else None,
        drop_path2=DropPath(drop_path) if drop_path > 0 else None,
    )
