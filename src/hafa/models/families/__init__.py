"""The families hafa.convert takes, one small adapter module each (docs/plugin.md walks through one).

Each module defines FAMILY (its Family) and TIMM_MODULES (the timm modules whose models it converts:
every model there is registered as hafa_<name> by hafa.models.registry, but those its family's
refused_models names)."""

import importlib

from ..convert import FAMILIES

FAMILY_MODULES = (
    "pvt_v2",
    "swin",
    "swinv2",
    "twins",
    "pvt",
    "metaformer",
    "convnext",
    "inception_next",
    "mambaout",
    "focalnet",
    "edgenext",
    "davit",
    "tiny_vit",
    "gcvit",
    "mvitv2",
)

TIMM_MODULES: dict[str, str] = {}
for _name in FAMILY_MODULES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    FAMILIES.append(_module.FAMILY)
    TIMM_MODULES.update(_module.TIMM_MODULES)

__all__ = ["FAMILIES", "FAMILY_MODULES", "TIMM_MODULES"]
