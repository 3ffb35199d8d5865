"""What the HAFA backbones share: the per-transition choice of downsampling, and the timm interface
(forward_features / forward_head / forward_intermediates / prune_intermediate_layers) over stages
that pass tokens and their TokenLayout from one to the next."""

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import LAA, SIA, ConvDownsample
from ..layers.attention import KeyValues
from ..ops import TokenLayout

AGGREGATIONS = ("conv", "laa", "sia")
HAFA_AGGREGATION = ("laa", "laa", "sia")
BASELINE_AGGREGATION = ("conv", "conv", "conv")


def check_stage_aggregation(stage_aggregation: Sequence[str]) -> tuple[str, str, str]:
    """Validate the per-transition choice (1->2, 2->3, 3->4) of 'conv', 'laa' or 'sia'."""
    choice = tuple(stage_aggregation)
    if len(choice) != 3 or any(c not in AGGREGATIONS for c in choice):
        raise ValueError(
            f"stage_aggregation must be 3 values (transitions 1->2, 2->3, 3->4) from {AGGREGATIONS}, "
            f"got {stage_aggregation!r}"
        )
    return choice


def grid_downsample(
    kind: str,
    in_dim: int,
    out_dim: int,
    kernel: int,
    stride: int,
    padding: int,
    sia_args: dict,
    norm_layer=nn.LayerNorm,
) -> nn.Module:
    """The downsampling layer of one transition: the baseline conv, its LAA form, or SIA."""
    if kind == "sia":
        return SIA(in_dim, out_dim, **sia_args)
    layer = LAA if kind == "laa" else ConvDownsample
    return layer(in_dim, out_dim, kernel, stride, padding, norm_layer=norm_layer)


def padding_tokens(layout: TokenLayout, padding_mask: Tensor) -> Tensor:
    """B x N bool: the tokens whose cells lie wholly in the padding of a batch of padded images
    (padding_mask: B x H x W over the input images, True for padding)."""
    image_share = layout.to_tokens((~padding_mask).unsqueeze(1).float())  # B x N x 1
    return image_share.squeeze(-1) == 0


def run_downsample(
    module: nn.Module,
    x: Tensor,
    layout: TokenLayout,
    padding_mask: Tensor | None = None,
) -> tuple[Tensor, TokenLayout, KeyValues | None]:
    """Apply a transition to B x N x C tokens: -> new tokens, their layout, and separate keys/values (SIA).
    padding_mask (B x H x W, True for padding of the input images): SIA makes no padding token a centre."""
    if isinstance(module, SIA):
        out = module(x, layout, None if padding_mask is None else padding_tokens(layout, padding_mask))
        return out.queries, out.layout, out.kv
    fmap = module(layout.to_map(x))  # B x H x W x C
    return fmap.flatten(1, 2), TokenLayout(fmap.shape[1:3]), None


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


class HafaBackbone(nn.Module):
    """Base of the HAFA model families.

    A family defines `stem(x) -> (tokens, layout)`, its stages (a ModuleList named `stages_name`, each
    `stage(tokens, layout) -> (tokens, layout)`), `self.norm` (final, or Identity), `self.head`, and
    may override `stage_output` and `pool`. forward_features returns the final tokens, B x N x C:
    after SIA they are merged tokens with no grid order, so the maps come from
    forward_intermediates, which paints them through the dictionary.
    """

    num_classes: int
    num_features: int
    global_pool: str
    feature_info: list[dict]
    stages_name = "stages"

    @property
    def stage_list(self) -> nn.ModuleList:
        return getattr(self, self.stages_name)

    def stage_output(self, index: int, x: Tensor, layout: TokenLayout, norm: bool) -> Tensor:
        """The NCHW feature map of a stage's output tokens."""
        if norm and index == len(self.stage_list) - 1:
            x = self.norm(x)
        return layout.to_map(x)

    def pool(self, x: Tensor) -> Tensor:
        return x.mean(1)

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stage_list:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        param = next(self.parameters())
        self.head = self._new_head(num_classes).to(device=param.device, dtype=param.dtype)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        padding_mask: Tensor | None = None,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage feature maps (strides 4, 8, 16, 32), B x C x H x W each; after SIA painted through the
        dictionary. Returns the maps, or (final tokens, maps).

        padding_mask: B x H x W bool, True where x is padding (detection batches pad images to a
        common size): tokens wholly in the padding never become SIA's cluster centres."""
        if output_fmt != "NCHW":
            raise ValueError("HAFA backbones return NCHW feature maps")
        stages = self.stage_list
        take_indices, max_index = feature_take_indices(len(stages), indices)
        intermediates = []
        x, layout = self.stem(x)
        last = max_index if stop_early or intermediates_only else len(stages) - 1
        for i, stage in enumerate(stages[: last + 1]):
            x, layout = stage(x, layout, padding_mask)
            if i in take_indices:
                intermediates.append(self.stage_output(i, x, layout, norm))
        if intermediates_only:
            return intermediates
        if last == len(stages) - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stage_list), indices)
        setattr(self, self.stages_name, self.stage_list[: max_index + 1])
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Images B x 3 x H x W -> final tokens B x N x C (normalised)."""
        x, layout = self.stem(x)
        for stage in self.stage_list:
            x, layout = stage(x, layout)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool:
            x = self.pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def hafa_cfg(**kwargs) -> dict:
    """Pretrained config: no download location; weights come from a local file
    (pretrained_cfg_overlay=dict(file=PATH)) or hafa.load_pretrained."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "fixed_input_size": False,
        "license": "apache-2.0",
        **kwargs,
    }
