"""Every model of the supported families as `hafa_<name>`, registered with timm: the HAFA conversion of
timm's `<name>` (or of our PVT v1), so that `timm.create_model("hafa_convnext_tiny")` and every hafa
command take it, and `--baseline` pairs it with `<name>`. Each takes its family's default transitions
(Family.default_stage_aggregation: LAA, LAA, SIA where the last stage attends, else LAA three times)."""

import sys
from functools import cache, partial

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg

from ..layers import HafaOptions
from ..pretrained import checkpoint_filter_fn
from .common import FROM_BASELINE_TAG, MODEL_ARGUMENTS, hafa_cfgs
from .convert import HafaModel
from .families import FAMILIES

# The families' models as timm (or hafa.models.pvt) names them, by family.
BASE_NAMES = {family.name: family.model_names for family in FAMILIES}
# Each HAFA model's baseline.
BASELINE = {f"hafa_{name}": name for names in BASE_NAMES.values() for name in names}
_FAMILY_OF_NAME = {name: family for family in FAMILIES for name in family.model_names}


def _cfgs(name: str) -> dict:
    """The pretrained configs of hafa_<name>: its base's input conventions, no weights (but the
    in1k_from_baseline tag where its family names the base's public weights)."""
    base = get_pretrained_cfg(name)
    conventions = {}
    if base is not None:
        conventions = {
            key: getattr(base, key)
            for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier")
            if getattr(base, key, None) is not None
        }
    return hafa_cfgs(f"hafa_{name}", _FAMILY_OF_NAME[name].baseline_weights.get(name), **conventions)


default_cfgs = generate_default_cfgs({tagged: cfg for name in BASELINE.values() for tagged, cfg in _cfgs(name).items()})


def _converted(base_name: str, options: HafaOptions, **kwargs) -> HafaModel:
    """hafa_<base_name>: the base (any input size) converted with the HAFA options."""
    return HafaModel(model=_FAMILY_OF_NAME[base_name].create(base_name, **kwargs), options=options)


@cache
def default_stage_aggregation(name: str) -> tuple[str, str, str]:
    """The transitions HAFA model `name` takes by default: its family's rule on its base model (built on
    the meta device: no memory, no computation)."""
    base_name = BASELINE[name]
    family = _FAMILY_OF_NAME[base_name]
    with torch.device("meta"):
        base = family.create(base_name)
    return family.default_stage_aggregation(base)


def create_hafa_model(variant: str, pretrained: bool = False, **kwargs) -> HafaModel:
    """timm's entry point of every hafa_<name>: build_model_with_cfg over the conversion, with timm's
    features_only wrapper over forward_intermediates. The in1k_from_baseline tag loads the baseline's
    weights through hafa.pretrained and puts LAA in baseline mode (unless laa_norm is given), so that
    the model starts as the baseline whose weights it loads."""
    chosen = {key: kwargs.pop(key) for key in list(kwargs) if key in HafaOptions.SETTINGS}
    for key in MODEL_ARGUMENTS.keys() & kwargs.keys():  # timm's models take these unchecked
        MODEL_ARGUMENTS[key].check(kwargs[key], key)
    tag = kwargs.get("pretrained_cfg")
    if pretrained and not isinstance(tag, dict):
        tag = resolve_pretrained_cfg(variant, pretrained_cfg=tag).tag
    if tag == FROM_BASELINE_TAG:
        chosen.setdefault("laa_norm", "baseline")
    options = HafaOptions.of(chosen)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        partial(_converted, variant.removeprefix("hafa_"), options),
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _entry_point(name: str):
    def create(pretrained: bool = False, **kwargs) -> HafaModel:
        return create_hafa_model(name, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"The HAFA form of {BASELINE[name]} (hafa.convert)."
    return create


for _name in BASELINE:
    setattr(sys.modules[__name__], _name, register_model(_entry_point(_name)))

__all__ = ["BASELINE", "BASE_NAMES", "create_hafa_model"]
