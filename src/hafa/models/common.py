"""What the HAFA models share besides their options (hafa.layers.HafaOptions): the other constructor
arguments' ranges, the input check, BatchNorm freezing, padding tokens, and the pretrained configs."""

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from ..layers.laa import BATCH_NORMS
from ..ops import TokenLayout
from ..spec import Number, Whole

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
    keep_sizes_static(x)


def keep_sizes_static(x: Tensor) -> None:
    """While compiling, specialise x's height and width (its last two sizes): under dynamic shapes the
    dictionary's size arithmetic (pooling taps, ceil and floor divisions) grows into symbolic expressions
    that take dynamo minutes to simplify, while a graph per input size compiles in seconds (docs/compile.md).
    The batch may stay dynamic."""
    if torch.compiler.is_compiling():
        torch._dynamo.mark_static(x, x.dim() - 2)
        torch._dynamo.mark_static(x, x.dim() - 1)


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
