"""What the HAFA backbones share: the constructor plumbing (the per-transition choice of downsampling,
the SIA and LAA arguments, the pool check, feature info and head, timm registration with pretrained
tags), and the timm interface (forward_features / forward_head / forward_intermediates /
prune_intermediate_layers) over stages that pass tokens and their TokenLayout from one to the next."""

from collections.abc import Callable, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import LAA, LAA_NORMS, SIA, ConvDownsample
from ..layers.attention import KeyValues
from ..layers.laa import BATCH_NORMS
from ..layers.sia import CLUSTER_RATIO, KNN_K
from ..ops import TokenLayout
from ..pretrained import checkpoint_filter_fn
from ..spec import Choice, Flag, Number, Values, Whole

AGGREGATIONS = ("conv", "laa", "sia")
HAFA_AGGREGATION = ("laa", "laa", "sia")
BASELINE_AGGREGATION = ("conv", "conv", "conv")
# The HAFA options of every HAFA model: their types, ranges and defaults.
HAFA_OPTIONS = {
    "stage_aggregation": Values(
        list(HAFA_AGGREGATION), item=Choice(choices=AGGREGATIONS), length=3, note="transitions 1->2, 2->3, 3->4"
    ),
    "cluster_ratio": CLUSTER_RATIO,
    "knn_k": KNN_K,
    "cluster_qkv": Flag(False),
    "laa_norm": Choice("batch", choices=LAA_NORMS),
}
# The other constructor arguments every HAFA model checks.
MODEL_ARGUMENTS = {
    "num_classes": Whole(1000, low=0, note="0: no classifier"),
    "in_chans": Whole(3, low=1),
    "drop_rate": Number(0.0, low=0, high=1, high_open=True),
    "drop_path_rate": Number(0.0, low=0, high=1, high_open=True),
    "proj_drop_rate": Number(0.0, low=0, high=1, high_open=True),
    "attn_drop_rate": Number(0.0, low=0, high=1, high_open=True),
}
# The pretrained tag that loads a baseline's ImageNet weights into the HAFA model (LAA in baseline mode).
FROM_BASELINE_TAG = "in1k_from_baseline"
# The smallest input side the backbones take: every one ends at stride 32, and PVT's spatial-reduction
# attention needs a whole 8x8 window at stride 4.
SMALLEST_INPUT = 32


def check_images(x: Tensor, in_chans: int) -> None:
    """A batch of images the backbones take: B x in_chans x H x W, B >= 1, H and W >= SMALLEST_INPUT.
    Shapes only: no device synchronisation."""
    if x.dim() != 4 or x.shape[0] < 1 or x.shape[1] != in_chans:
        raise ValueError(f"images must be B x {in_chans} x H x W with B >= 1, got a tensor of shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < SMALLEST_INPUT:
        raise ValueError(
            f"images must be at least {SMALLEST_INPUT} x {SMALLEST_INPUT} pixels (the models end at stride 32), "
            f"got {x.shape[-2]} x {x.shape[-1]}"
        )


def freeze_batch_norm_statistics(module: nn.Module) -> int:
    """Put every BatchNorm inside `module` (SyncBatchNorm too) in eval mode, so that fine-tuning uses
    and keeps its running statistics (mmdetection's norm_eval). module.train() undoes it: call this
    after each train(). Returns how many were frozen."""
    norms = [m for m in module.modules() if isinstance(m, BATCH_NORMS)]
    for norm in norms:
        norm.eval()
    return len(norms)


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
    `stage(tokens, layout, padding_mask) -> (tokens, layout)`) built with `transition` for the
    downsamplings, `self.norm` (final, or Identity), and calls `init_head`. forward_features returns
    the final tokens, B x N x C (after `num_prefix_tokens` class tokens): after SIA they are merged
    tokens with no grid order, so the maps come from forward_intermediates, which paints them
    through the dictionary.
    """

    stages_name = "stages"

    def __init__(
        self,
        *,
        num_classes: int,
        global_pool: str,
        stage_aggregation: Sequence[str],
        cluster_qkv: bool,
        cluster_ratio: float,
        knn_k: int,
        laa_norm: str,
        class_token: bool = False,
        **arguments,
    ):
        """arguments: the MODEL_ARGUMENTS the family takes (num_classes, in_chans, drop rates), checked."""
        super().__init__()
        for name, value in arguments.items():
            MODEL_ARGUMENTS[name].check(value, name)
        pools = ("token", "avg", "") if class_token else ("avg", "")
        if global_pool not in pools:
            raise ValueError(f"global_pool must be one of {pools}, got {global_pool!r}")
        self.num_classes = MODEL_ARGUMENTS["num_classes"].check(num_classes, "num_classes")
        self.in_chans = arguments.get("in_chans", 3)
        self.global_pool = global_pool
        self.num_prefix_tokens = int(class_token)
        options = dict(
            stage_aggregation=stage_aggregation,
            cluster_ratio=cluster_ratio,
            knn_k=knn_k,
            cluster_qkv=cluster_qkv,
            laa_norm=laa_norm,
        )
        options = {name: HAFA_OPTIONS[name].check(value, name) for name, value in options.items()}
        self.stage_aggregation = tuple(options["stage_aggregation"])
        self.laa_norm = options["laa_norm"]
        self.sia_args = dict(
            cluster_ratio=options["cluster_ratio"], knn_k=options["knn_k"], cluster_qkv=options["cluster_qkv"]
        )

    def transition(
        self,
        index: int,
        in_dim: int,
        out_dim: int,
        *,
        kernel_size: int,
        stride: int,
        padding: int,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> nn.Module:
        """The downsampling into stage `index` (1-3): the baseline conv, its LAA form, or SIA."""
        kind = self.stage_aggregation[index - 1]
        if kind == "sia":
            return SIA(in_dim, out_dim, **self.sia_args)
        conv = dict(kernel_size=kernel_size, stride=stride, padding=padding, norm_layer=norm_layer)
        if kind == "laa":
            return LAA(in_dim, out_dim, laa_norm=self.laa_norm, **conv)
        return ConvDownsample(in_dim, out_dim, **conv)

    def init_head(self, stage_dims: Sequence[int], drop_rate: float, stem_stride: int = 4) -> None:
        """Feature info of the four stages, and the classifier on the last one."""
        self.feature_info = [
            dict(num_chs=dim, reduction=stem_stride * 2**i, module=f"{self.stages_name}.{i}")
            for i, dim in enumerate(stage_dims)
        ]
        self.num_features = self.head_hidden_size = stage_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(self.num_classes)

    @staticmethod
    def init_linear_and_offsets(m: nn.Module) -> None:
        """Linear layers truncated normal (std 0.02, zero bias); LAA offsets at exactly zero."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif hasattr(m, "reset_offsets"):
            m.reset_offsets()

    @property
    def stage_list(self) -> nn.ModuleList:
        return getattr(self, self.stages_name)

    def stage_output(self, index: int, x: Tensor, layout: TokenLayout, norm: bool) -> Tensor:
        """The NCHW feature map of a stage's output tokens (the class token left out)."""
        if norm and index == len(self.stage_list) - 1:
            x = self.norm(x)
        if index == len(self.feature_info) - 1:  # the stage that holds the class token, if any
            x = x[:, self.num_prefix_tokens :]
        return layout.to_map(x)

    def pool(self, x: Tensor) -> Tensor:
        return x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(1)

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
        check_images(x, self.in_chans)
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
        check_images(x, self.in_chans)
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
    """Pretrained config without weights (a local file can be given: pretrained_cfg_overlay=dict(file=PATH))."""
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


def hafa_cfgs(name: str, baseline_weights: dict | None, **kwargs) -> dict[str, dict]:
    """The pretrained configs of a HAFA model: untagged (no weights) and, where its baseline has public
    ImageNet weights (baseline_weights: their hf_hub_id or url, and crop_pct ...), the tag
    `in1k_from_baseline` that loads them through hafa's adaptation with LAA in baseline mode."""
    cfgs = {name: hafa_cfg(**kwargs)}
    if baseline_weights is not None:
        cfgs[f"{name}.{FROM_BASELINE_TAG}"] = hafa_cfg(**{**kwargs, **baseline_weights})
    return cfgs


def create_backbone(model_cls: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's build_model_with_cfg for a HAFA family: checkpoints adapted by hafa.pretrained, feature
    maps through forward_intermediates. The `in1k_from_baseline` tag puts LAA in baseline mode (unless
    laa_norm is given), so that the model starts as the baseline whose weights it loads."""
    tag = kwargs.get("pretrained_cfg")
    if pretrained and not isinstance(tag, dict):
        tag = resolve_pretrained_cfg(variant, pretrained_cfg=tag).tag
    if tag == FROM_BASELINE_TAG:
        kwargs.setdefault("laa_norm", "baseline")
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )
