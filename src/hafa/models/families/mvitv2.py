"""MViTv2 (timm's MultiScaleVit) as a HAFA family: a model that downsamples inside attention.

MViTv2 has no layer between its stages: the first block of stages 2-4 (`stages.N.blocks.0`, the
transition) pools the queries of its attention with a 3x3/s2 depthwise conv per head (`attn.pool_q`, then
the query norm `attn.norm_q`) and its shortcut with a 3x3/s2 max pool (`shortcut_pool_attn`); keys and
values are pooled at a stride of their own that keeps them on the grid of the block's input.

LAA: both poolings of that block read their input at learned offsets that start at zero. The query
pooling becomes a depthwise hafa.layers.DeformableConv2d (offsets predicted per head from the head's
queries; laa_norm="batch" puts BatchNorm and GELU after it in place of the query norm, as after every LAA
conv), the max pool a DeformableMaxPool2d (the max over bilinear samples at the moved points). With
laa_norm="baseline" and zero offsets the block is timm's.

SIA, the paper's own idea, which pooling attention fits directly: the queries are clustered, keys and
values stay on the grid. The first block clusters its input tokens (DPC-KNN on the normalised tokens) and
merges per cluster, weighted by the softmax of a learned importance score, what the block's own poolings
give each token (brought back from their stride-2 maps, the paper's projection through the family's
downsampling): the pooled query plus the token's own query, and the max-pooled shortcut. Its keys and
values are timm's, pooled from the grid. Later blocks of the stage attend from the merged tokens to keys
and values pooled from the dictionary's map, their stride-1 query pooling through the dictionary too.
The relative position embeddings of those blocks (of query-to-key cell offsets: a merged token has no
cell) are left out, as Swin's relative position biases are.

The stages take and give NHWC maps here (timm's take tokens and their size); forward_features returns
timm's normalised tokens. A model takes the square input size it was built for (`img_size`: timm sizes
its relative position tables for it). The class-token models are refused.
"""

import timm
import torch
from timm.models import mvitv2
from timm.models.mvitv2 import MultiScaleAttention, MultiScaleBlock, MultiScaleVit
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from ...layers import DeformableConv2d, HafaOptions
from ...layers.laa import check_geometry, check_laa_norm, check_map, deformable_columns, zero_offsets_
from ...layers.sia import init_layer
from ...ops import TokenLayout, cluster_dpc_knn, merge_tokens
from ..common import padding_tokens
from ..family import ChannelsLastFamily

CLASS_TOKEN = (
    "a class token (a token with no cell) travels through the pooling of every stage, which HAFA's stages do "
    "not carry; convert a model without one (mvitv2_tiny, _small, _base, _large)"
)
# The timm models this family refuses, with the reason hafa.convert gives (they are not registered).
REFUSED = {name: CLASS_TOKEN for name, cfg in mvitv2.model_cfgs.items() if cfg.use_cls_token}


class DeformableMaxPool2d(nn.Module):
    """A max pool read at learned offsets (zero at start): the max over bilinear samples at its kernel
    points moved by offsets predicted from the input (a conv of the pool's kernel, stride and padding).
    A point wholly outside the map is left out, as the pool's padding; one partly outside is the
    bilinear mean of the pixels inside. With zero offsets it is the pool. It has no norm: laa_norm only
    records the conversion's mode. B x C x H x W -> B x C x Ho x Wo."""

    def __init__(self, *, channels: int, kernel_size, stride, padding=0, laa_norm: str = "baseline"):
        super().__init__()
        check_geometry("DeformableMaxPool2d", channels, channels, kernel_size, stride, padding)
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.laa_norm = check_laa_norm(laa_norm)
        points = self.kernel_size[0] * self.kernel_size[1]
        self.offset = nn.Conv2d(channels, 2 * points, self.kernel_size, stride=self.stride, padding=self.padding)
        self.reset_offsets()

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d, *, channels: int, laa_norm: str) -> "DeformableMaxPool2d":
        if pool.ceil_mode or _pair(pool.dilation) != (1, 1):
            raise ValueError(f"LAA deforms max pools without ceil_mode or dilation, not {pool}; keep it 'conv'")
        return cls(
            channels=channels, kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding, laa_norm=laa_norm
        )

    def reset_offsets(self) -> None:
        zero_offsets_(self.offset)

    def sampling_geometry(self) -> tuple[tuple, tuple, tuple]:
        return self.kernel_size, self.stride, self.padding

    def forward(self, x: Tensor, return_offsets: bool = False):
        check_map(x, self.offset.in_channels, "DeformableMaxPool2d")
        offsets = self.offset(x)
        geometry = (self.kernel_size, self.stride, self.padding)
        samples = deformable_columns(x, offsets, *geometry)  # B x L x K x C
        inside = deformable_columns(torch.ones_like(x[:, :1]), offsets, *geometry)  # the in-map weight of each
        outside = inside == 0
        samples = (samples / inside.clamp_min(1e-6)).masked_fill(outside, float("-inf"))
        out = samples.amax(2).masked_fill(outside.all(2), 0)  # no point inside: 0, not -inf
        out = out.transpose(1, 2).reshape(*x.shape[:2], *offsets.shape[-2:])
        return (out, offsets) if return_offsets else out


def heads_map(layout: TokenLayout, tokens: Tensor, num_heads: int) -> Tensor:
    """B x N x (heads * d) tokens -> their map per head, B*heads x d x H x W (as timm pools them)."""
    feature_map = layout.to_map(tokens)
    B, C, H, W = feature_map.shape
    return feature_map.reshape(B * num_heads, C // num_heads, H, W)


def _identity_if_none(module: nn.Module | None) -> nn.Module:
    return nn.Identity() if module is None else module


class PoolingAttention(nn.Module):
    """timm's MultiScaleAttention over tokens with a layout, with its layers: a fused qkv, each of queries,
    keys and values pooled per head on the layout's map (through the dictionary after SIA) and normalised,
    the residual pooling (the normalised queries added to the output); no relative position embedding.
    B x N x C -> B x N x dim_out."""

    def __init__(self, *, attn: MultiScaleAttention):
        super().__init__()
        self.num_heads, self.scale, self.residual_pooling = attn.num_heads, attn.scale, attn.residual_pooling
        self.qkv, self.proj = attn.qkv, attn.proj
        self.pool_q, self.norm_q = _identity_if_none(attn.pool_q), _identity_if_none(attn.norm_q)
        self.pool_k, self.norm_k = _identity_if_none(attn.pool_k), _identity_if_none(attn.norm_k)
        self.pool_v, self.norm_v = _identity_if_none(attn.pool_v), _identity_if_none(attn.norm_v)

    def _pooled(self, pool: nn.Module, norm: nn.Module, layout: TokenLayout, tokens: Tensor) -> Tensor:
        """Keys or values B x N x D pooled on the map: B x heads x L x d, normalised."""
        pooled = pool(heads_map(layout, tokens, self.num_heads))
        return norm(pooled.reshape(tokens.shape[0], self.num_heads, pooled.shape[1], -1).transpose(2, 3))

    def project(self, x: Tensor, layout: TokenLayout) -> tuple[Tensor, Tensor, Tensor]:
        """-> queries B x N x D (not pooled yet), keys and values B x heads x L x d (pooled, normalised)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return q, self._pooled(self.pool_k, self.norm_k, layout, k), self._pooled(self.pool_v, self.norm_v, layout, v)

    def pool_queries(self, layout: TokenLayout, q: Tensor) -> Tensor:
        """Queries B x N x D pooled on the layout's map: B x D x Ho x Wo."""
        pooled = self.pool_q(heads_map(layout, q, self.num_heads))
        return pooled.reshape(q.shape[0], q.shape[2], *pooled.shape[-2:])

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Pooled queries B x M x D over keys and values B x heads x L x d -> B x M x D."""
        B, M, D = q.shape
        q = self.norm_q(q.view(B, M, self.num_heads, -1).transpose(1, 2))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        if self.residual_pooling:
            out = out + q
        return self.proj(out.transpose(1, 2).reshape(B, M, D))

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """A block that keeps the layout (stride-1 query pooling): x B x N x C -> B x N x D."""
        q, k, v = self.project(x, layout)
        return self.attend(layout.to_tokens(self.pool_queries(layout, q)), k, v)


class ClusteredBlock(nn.Module):
    """A MViTv2 block on merged tokens with the block's own layers (the names timm gives them): attention
    as PoolingAttention, then timm's MLP and shortcuts. B x N x C -> B x N x dim_out."""

    def __init__(self, *, block: MultiScaleBlock):
        super().__init__()
        self.norm1, self.attn, self.drop_path1 = block.norm1, PoolingAttention(attn=block.attn), block.drop_path1
        self.shortcut_proj_attn = block.shortcut_proj_attn
        self.norm2, self.mlp, self.drop_path2 = block.norm2, block.mlp, block.drop_path2
        self.shortcut_proj_mlp = block.shortcut_proj_mlp

    def mlp_part(self, x: Tensor) -> Tensor:
        x_norm = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path2(self.mlp(x_norm))

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        x_norm = self.norm1(x)
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        return self.mlp_part(shortcut + self.drop_path1(self.attn(x_norm, layout)))


class ClusteringBlock(ClusteredBlock):
    """The transition block as SIA: its queries clustered, keys and values on the grid (module docstring).
    New layer: `score` (the importance of each token). -> (merged tokens B x M x dim_out, their layout)."""

    def __init__(self, *, block: MultiScaleBlock, options: HafaOptions):
        super().__init__(block=block)
        self.shortcut_pool_attn = block.shortcut_pool_attn
        self.options = options
        self.score = nn.Linear(block.dim, 1, bias=False)  # no bias: a cluster's softmax ignores a shift
        init_layer(self.score)

    def forward(self, x: Tensor, layout: TokenLayout, mask: Tensor | None = None) -> tuple[Tensor, TokenLayout]:
        """x: B x N x C tokens with their layout; mask: B x N, True for padding (never a centre)."""
        x_norm = self.norm1(x)
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        num_clusters = self.options.num_clusters(x.shape[1])
        cluster_ids, _ = cluster_dpc_knn(x_norm, num_clusters, self.options.knn_k, mask)
        q, k, v = self.attn.project(x_norm, layout)
        pooled_q = self.attn.pool_queries(layout, q)
        pooled_shortcut = layout.to_tokens(self.shortcut_pool_attn(layout.to_map(shortcut)))
        merged = merge_tokens(
            torch.cat([q + layout.to_tokens(pooled_q), pooled_shortcut], dim=-1),
            cluster_ids,
            num_clusters,
            self.score(x_norm).squeeze(-1),
        )
        q, shortcut = merged.split([q.shape[-1], pooled_shortcut.shape[-1]], dim=-1)
        x = self.mlp_part(shortcut + self.drop_path1(self.attn.attend(q, k, v)))
        return x, layout.compose(cluster_ids, num_clusters, pooled_q.shape[-2:])


class ClusteredStage(nn.Module):
    """A MViTv2 stage that starts with SIA: its ClusteringBlock, then ClusteredBlocks on the merged tokens.
    (B x N x C tokens, layout, padding_mask B x H x W of the images) -> (B x M x dim_out, their layout)."""

    def __init__(self, *, blocks: nn.ModuleList):
        super().__init__()
        self.blocks = blocks
        self.grad_checkpointing = False

    def forward(self, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None = None):
        mask = None if padding_mask is None else padding_tokens(layout, padding_mask)
        x, layout = self.blocks[0](x, layout, mask)
        for block in self.blocks[1:]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
        return x, layout


class MViTv2(ChannelsLastFamily):
    name = "mvitv2"
    model_names = tuple(name for name in timm.list_models(module="mvitv2") if name not in REFUSED)
    model_classes = (MultiScaleVit,)
    final_norm_name = "norm"

    def prepare(self, model: nn.Module, stage_aggregation: tuple) -> None:
        if model.cls_token is not None:
            raise ValueError(f"hafa.convert cannot take this mvitv2 model: {CLASS_TOKEN}")
        attention = model.stages[0].blocks[0].attn
        if type(attention) is not MultiScaleAttention or not isinstance(attention.pool_q, nn.Conv2d):
            raise ValueError(
                f"hafa.convert takes mvitv2 models that pool with convs after the qkv projection (timm's default, "
                f"mode='conv', pool_first=False), not {type(attention).__name__} with mode={attention.mode!r}"
            )

    def first_block(self, model: nn.Module, index: int) -> nn.Module:
        return self.stages(model)[index].blocks[0]

    def pooling_block(self, model: nn.Module, index: int) -> MultiScaleBlock:
        """Stage `index`'s first block, where it downsamples (a strided query pooling and shortcut pool)."""
        block = self.first_block(model, index)
        if block.shortcut_pool_attn is None or block.attn.pool_q.stride == (1, 1):
            raise ValueError(
                f"mvitv2's stage {index + 1} does not downsample (its first block pools with stride 1: the model "
                "was built with another stride_q), so there is no transition for LAA or SIA; keep it 'conv'"
            )
        return block

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        x, size = model.patch_embed(images)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return x.unflatten(1, tuple(size))

    def run_stage(self, model: nn.Module, index: int, x: Tensor) -> Tensor:
        tokens, size = self.stages(model)[index](x.flatten(1, 2), x.shape[1:3])
        return tokens.unflatten(1, tuple(size))

    def grid_features(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.norm(x)

    def grid_output(self, model: nn.Module, features: Tensor) -> Tensor:
        return features.flatten(1, 2)

    def token_features(self, model: nn.Module, tokens: Tensor) -> Tensor:
        return model.norm(tokens)

    def token_head(self, model: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
        self.check_token_pool(model.global_pool)
        return model.base_class.forward_head(model, tokens, pre_logits=pre_logits)

    def attention_stages(self, model: nn.Module) -> set[int]:
        return {0, 1, 2, 3}

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        block = self.pooling_block(model, index)
        attn = block.attn
        attn.pool_q = DeformableConv2d.from_conv(attn.pool_q, laa_norm)
        if laa_norm == "batch":  # BatchNorm and GELU after the deformable pooling, in place of the query norm
            attn.norm_q = nn.Identity()
        channels = block.dim if block.shortcut_proj_attn is None else block.shortcut_proj_attn.out_features
        with torch.device(block.norm1.weight.device):
            block.shortcut_pool_attn = DeformableMaxPool2d.from_pool(
                block.shortcut_pool_attn, channels=channels, laa_norm=laa_norm
            )

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        if options.cluster_qkv:
            raise ValueError(
                "cluster_qkv=True: mvitv2's SIA clusters the queries only (its keys and values are pooled on the "
                "grid inside the attention); use cluster_qkv=False"
            )
        stage = model.stages[index]
        first = self.pooling_block(model, index)
        with torch.device(first.norm1.weight.device):
            clustering = ClusteringBlock(block=first, options=options)
        blocks = nn.ModuleList([clustering, *(ClusteredBlock(block=block) for block in stage.blocks[1:])])
        model.stages[index] = ClusteredStage(blocks=blocks)


FAMILY = MViTv2()
