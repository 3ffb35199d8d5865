"""Attention of queries over separate keys/values, and the transformer block built on it.

Both work on tokens with a TokenLayout, so the same block serves a plain grid (a reshape) and
merged tokens after SIA (through the dictionary) wherever a feature map is needed: PVT's spatial
reduction of keys/values and PVT v2's depthwise conv in the MLP. Parameter names follow timm's
pvt_v2 (q, kv, sr, norm, proj; fc1, dwconv, fc2) so baseline checkpoints load by name.
"""

from collections.abc import Callable

import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from ..ops import TokenLayout

KeyValues = tuple[Tensor, TokenLayout]


class Attention(nn.Module):
    """Multi-head attention; keys/values from the queries' tokens or from a separate token set.

    sr_ratio > 1: keys/values come from the map reduced by a sr_ratio x sr_ratio strided conv (PVT);
    linear=True: from the map pooled to 7 x 7 then a 1x1 conv (PVT v2-li).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        sr_ratio: int = 1,
        linear: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool = nn.AdaptiveAvgPool2d(7) if linear else None
        if linear or sr_ratio > 1:
            self.sr = (
                nn.Conv2d(dim, dim, kernel_size=1)
                if linear
                else nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            )
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = self.norm = None
        self.act = nn.GELU() if linear else None

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
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class DepthwiseConvMlp(nn.Module):
    """PVT v2's MLP: fc1, a 3x3 depthwise conv on the feature map, GELU, fc2. B x N x C -> B x N x C."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, extra_relu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        x = layout.to_tokens(self.dwconv(layout.to_map(self.relu(self.fc1(x)))))
        return self.drop(self.fc2(self.drop(self.act(x))))


class Block(nn.Module):
    """Pre-norm transformer block: attention (optionally over separate keys/values), then MLP.

    dwconv_mlp selects PVT v2's MLP; otherwise timm's plain Mlp (PVT v1, Swin after SIA).
    """

    def __init__(
        self,
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
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            sr_ratio=sr_ratio,
            linear=linear,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.dwconv_mlp = dwconv_mlp
        self.mlp = (
            DepthwiseConvMlp(dim, hidden_dim=hidden, drop=proj_drop, extra_relu=linear)
            if dwconv_mlp
            else Mlp(dim, hidden_features=hidden, drop=proj_drop)
        )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, layout: TokenLayout, kv: KeyValues | None = None) -> Tensor:
        """x: B x N x C with its layout; kv: separate keys/values (normalised here like x)."""
        if kv is not None:
            kv = (self.norm1(kv[0]), kv[1])
        x = x + self.drop_path1(self.attn(self.norm1(x), layout, kv))
        y = self.norm2(x)
        return x + self.drop_path2(self.mlp(y, layout) if self.dwconv_mlp else self.mlp(y))
