"""The families hafa.convert takes, one small adapter module each (docs/plugin.md walks through one).

Each module defines FAMILY (its Family) and TIMM_MODULES (the timm modules whose models it converts:
every model there is registered as hafa_<name> by hafa.models.registry), and may define REFUSED (timm
name -> why hafa.convert refuses it: such models are not registered)."""

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
    "mvitv2",
)

TIMM_MODULES: dict[str, str] = {}
REFUSED: dict[str, str] = {}
for _name in FAMILY_MODULES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    FAMILIES.append(_module.FAMILY)
    TIMM_MODULES.update(_module.TIMM_MODULES)
    REFUSED.update(getattr(_module, "REFUSED", {}))

__all__ = ["FAMILIES", "FAMILY_MODULES", "REFUSED", "TIMM_MODULES"]
