"""`Family`: what hafa.convert needs to know of one family of hierarchical models, and the pieces its
adapters (hafa.models.families, one module each) build the HAFA form from. docs/plugin.md walks through
adding one.

A family says which models it takes (its model classes and the names it registers as hafa_<name>), how
its model runs stage by stage, its LAA and SIA forms, how its checkpoints' names become the HAFA model's,
and its defaults. Grid stages keep the family's own format ("native": whatever its stages pass on, e.g.
NCHW or NHWC maps); a stage that starts with SIA works on tokens B x N x C with their TokenLayout.
"""

from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import HAFA_AGGREGATION, SIA, Attention, HafaOptions
from ..layers.attention import KeyValues
from ..ops import TokenLayout
from .common import padding_tokens


class Family:
    """How HAFA runs one family of hierarchical models. The defaults fit models whose stages are modules
    in `model.<stages_name>`, taking and giving NCHW maps; a family overrides what differs."""

    name = ""
    model_classes: tuple[type, ...] = ()
    # The names of the family's models (timm's, or ours): each is registered as hafa_<name>.
    model_names: tuple[str, ...] = ()
    # base name -> where its public ImageNet-1k weights are (hf_hub_id or url): hafa_<name> gets the
    # pretrained tag in1k_from_baseline, which loads them adapted, LAA in baseline mode.
    baseline_weights: dict[str, dict] = {}
    stages_name = "stages"
    final_norm_name: str | None = None  # the model's norm after the last stage, if it has one

    def create(self, name: str, **kwargs) -> nn.Module:
        """The family's model `name` (for hafa_<name>), built to take any input size."""
        return timm.create_model(name, **kwargs)

    def default_stage_aggregation(self, model: nn.Module) -> tuple[str, str, str]:
        """hafa_<name>'s transitions: the paper's LAA, LAA, SIA where the last stage attends, else LAA
        three times (SIA merges tokens for attention)."""
        return HAFA_AGGREGATION if 3 in self.attention_stages(model) else ("laa", "laa", "laa")

    def prepare(self, model: nn.Module, stage_aggregation: tuple) -> None:
        """Changes of the whole model that a conversion needs before its transitions are converted."""

    # -- the model as the family runs it
    def stem(self, model: nn.Module, images: Tensor) -> Any:
        raise NotImplementedError

    def stages(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.stages_name)

    def run_stage(self, model: nn.Module, index: int, x: Any) -> Any:
        """Grid stage `index` (its transition included) on its native input."""
        return self.stages(model)[index](x)

    def to_nchw(self, model: nn.Module, index: int, x: Any) -> Tensor:
        """Stage `index`'s native output as a B x C x H x W map."""
        return x

    def from_nchw(self, model: nn.Module, index: int, feature_map: Tensor) -> Any:
        """A B x C x H x W map as the native input of stage `index` (a grid stage after a clustered one)."""
        return feature_map

    def tokens_of(self, model: nn.Module, index: int, x: Any) -> tuple[Tensor, TokenLayout]:
        """Stage `index - 1`'s native output as tokens on their grid, the input of SIA at stage `index`."""
        feature_map = self.to_nchw(model, index - 1, x)
        return feature_map.flatten(2).transpose(1, 2), TokenLayout(feature_map.shape[-2:])

    def grid_features(self, model: nn.Module, x: Any) -> Any:
        """What forward_features returns after the last stage, a grid (the family's final norm)."""
        return x

    def grid_output(self, model: nn.Module, features: Any) -> Any:
        """What forward_features returns from grid_features' result, in the form the model's own
        forward_head takes (default: as it is; MViTv2's stages pass maps, its head takes tokens)."""
        return features

    def token_features(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """forward_features after a last stage that started with SIA: the final tokens, normalised."""
        return tokens

    # The pool types of `global_pool` the token head takes (those of timm's PVT v2 and Twins, and of our
    # PVT v1 after SIA); None: the family's head pools with its own pooling layer, whatever its type.
    token_pools: tuple[str, ...] | None = ("avg", "")

    def check_token_pool(self, pool_type: str) -> None:
        """A ValueError naming the pool type when the head cannot pool merged tokens with it as the
        model's own head pools a map."""
        if self.token_pools is not None and pool_type not in self.token_pools:
            allowed = " or ".join(repr(p) for p in self.token_pools)
            raise ValueError(
                f"global_pool {pool_type!r}: a {self.name} model whose last stage starts with SIA pools its merged "
                f"tokens with {allowed} only (as timm's {self.name} head takes them)"
            )

    def token_head(self, model: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
        """The classifier on final merged tokens B x N x C, pooled as the model's head pools the positions
        of a map (default: timm's `global_pool`, 'avg' or '' (none), `head_drop` and `head` attributes,
        as PVT's)."""
        self.check_token_pool(model.global_pool)
        if model.global_pool:
            tokens = tokens.mean(1)
        tokens = model.head_drop(tokens)
        return tokens if pre_logits else model.head(tokens)

    # -- conversion
    def attention_stages(self, model: nn.Module) -> set[int]:
        """The stages (0-3) whose blocks attend: SIA can start only those."""
        raise NotImplementedError

    def convert_laa(self, model: nn.Module, index: int, laa_norm: str) -> None:
        """Replace transition `index` (1-3) by its LAA form, with the transition's contract."""
        raise NotImplementedError

    def convert_sia(self, model: nn.Module, index: int, options: HafaOptions) -> None:
        """Replace stage `index` (1-3) by one that starts with SIA (projecting with the family's own
        downsampling) and whose blocks run on merged tokens."""
        raise NotImplementedError

    def run_clustered_stage(
        self, model: nn.Module, index: int, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None
    ) -> tuple[Tensor, TokenLayout]:
        return self.stages(model)[index](x, layout, padding_mask)

    def checkpoint_names(self, state_dict: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's names as the model (a baseline of the family, or its HAFA form with the names
        `targets`) has them: official layouts as timm's, and layers the conversion renamed (hafa.
        load_pretrained; a fused qkv split into q and kv and a downsampling moved into SIA's projection are
        handled for every family)."""
        return state_dict

    def prune(self, model: nn.Module, max_index: int) -> None:
        """Keep stages 0..max_index only."""
        setattr(model, self.stages_name, self.stages(model)[: max_index + 1])

    def drop_head(self, model: nn.Module) -> None:
        """Remove the classifier and pooling (prune_intermediate_layers, features_only); a family whose
        head reset needs more (timm's MLP heads: reset_other, a pool type they take) does it its own way."""
        model.reset_classifier(0, "")


class ChannelsLastFamily(Family):
    """A family whose stages pass NHWC maps (B x H x W x C): Swin, Swin v2, MambaOut, MViTv2."""

    def to_nchw(self, model: nn.Module, index: int, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)

    def from_nchw(self, model: nn.Module, index: int, feature_map: Tensor) -> Tensor:
        return feature_map.permute(0, 2, 3, 1)

    def tokens_of(self, model: nn.Module, index: int, x: Tensor) -> tuple[Tensor, TokenLayout]:
        return x.flatten(1, 2), TokenLayout(x.shape[1:3])


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """new (built on the meta device, of old's structure) holding old's own tensors, the buffers that
    state dicts leave out (relative position indices, masks) included."""
    new.load_state_dict(old.state_dict(), assign=True)
    for name, buffer in old.named_buffers():
        owner, _, leaf = name.rpartition(".")
        new.get_submodule(owner)._buffers[leaf] = buffer
    return new.train(old.training)


def split_qkv(qkv: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
    """A fused qkv projection as q and kv projections over views of its weight and bias."""
    dim = qkv.out_features // 3
    with torch.device("meta"):
        q, kv = (
            nn.Linear(qkv.in_features, dim, bias=qkv.bias is not None),
            nn.Linear(qkv.in_features, 2 * dim, bias=qkv.bias is not None),
        )
    q.weight, kv.weight = nn.Parameter(qkv.weight.detach()[:dim]), nn.Parameter(qkv.weight.detach()[dim:])
    if qkv.bias is not None:
        q.bias, kv.bias = nn.Parameter(qkv.bias.detach()[:dim]), nn.Parameter(qkv.bias.detach()[dim:])
    return q, kv


def fused_qkv_attention(attention: nn.Module) -> Attention:
    """An attention with a fused qkv (windowed or not) as global attention over tokens, with its weights."""
    q, kv = split_qkv(attention.qkv)
    return Attention(
        num_heads=attention.num_heads,
        q=q,
        kv=kv,
        proj=attention.proj,
        attn_drop=attention.attn_drop.p,
        proj_drop=attention.proj_drop.p,
        scale=attention.scale,
    )


def subsampled_attention(attention: nn.Module) -> Attention:
    """A timm attention with separate q and kv projections and an optional spatial reduction of the
    keys/values (PVT v2's, Twins' global sub-sampled attention) over tokens with a layout, with its layers."""
    return Attention(
        num_heads=attention.num_heads,
        q=attention.q,
        kv=attention.kv,
        proj=attention.proj,
        sr=attention.sr,
        norm=attention.norm,
        pool=getattr(attention, "pool", None),
        act=getattr(attention, "act", None),
        attn_drop=attention.attn_drop.p,
        proj_drop=attention.proj_drop.p,
    )


def tokens_as_map(tokens: Tensor) -> Tensor:
    """B x N x C tokens as a B x C x N x 1 map, whose positions channels-first layers (a head's pooling
    and LayerNorm2d) treat as a map's."""
    return tokens.transpose(1, 2).unsqueeze(-1)


def map_head_on_tokens(head: nn.Module, tokens: Tensor, pre_logits: bool) -> Tensor:
    """A timm head over NCHW maps with its own pooling layer (NormMlpClassifierHead, ClassifierHead) on
    merged tokens B x N x C laid out as an N x 1 map: pooled as it pools a map's positions, whatever its
    pool type; without pooling, a prediction per token (B x N x K)."""
    x = head(tokens_as_map(tokens), pre_logits=pre_logits)
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


def run_blocks(
    blocks: nn.ModuleList, x: Tensor, layout: TokenLayout, kv: KeyValues | None, use_checkpoint: bool
) -> Tensor:
    """Blocks over tokens; the first one attends to kv when given (SIA's keys/values)."""
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, layout, kv, use_reentrant=False)
        else:
            x = block(x, layout, kv)
        kv = None
    return x


def run_sia(sia: SIA, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None) -> tuple:
    """SIA on tokens with their layout: -> (merged tokens, their layout, keys/values for the first block).
    padding_mask (B x H x W over the input images, True for padding): no padding token becomes a centre."""
    out = sia(x, layout, None if padding_mask is None else padding_tokens(layout, padding_mask))
    return out.queries, out.layout, out.kv


class ClusteredStage(nn.Module):
    """A stage that starts with SIA: its blocks run on the merged tokens (the first attending to SIA's
    keys/values), then the stage's own norm, if it has one. `transition_name` is the name the family
    gives its transition (downsample, patch_embed ...), so that the stage's keys stay the family's."""

    def __init__(self, *, sia: SIA, blocks: nn.ModuleList, norm: nn.Module | None = None, transition_name="downsample"):
        super().__init__()
        self.transition_name = transition_name
        self.add_module(transition_name, sia)
        self.blocks = blocks
        self.norm = norm if norm is not None else nn.Identity()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: Tensor, layout: TokenLayout, padding_mask: Tensor | None = None):
        x, layout, kv = run_sia(getattr(self, self.transition_name), x, layout, padding_mask)
        return self.norm(run_blocks(self.blocks, x, layout, kv, self.grad_checkpointing)), layout
