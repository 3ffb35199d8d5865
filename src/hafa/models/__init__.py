"""HAFA models: `hafa.convert` (a hierarchical timm model, or our PVT v1, in its HAFA form) and
every model of the supported families registered with timm as hafa_<name> on import."""

from . import pvt, registry
from .common import freeze_batch_norm_statistics
from .convert import HafaModel, convert
from .families import FAMILIES
from .family import Family
from .pvt import PyramidVisionTransformer

__all__ = [
    "convert",
    "HafaModel",
    "Family",
    "FAMILIES",
    "PyramidVisionTransformer",
    "freeze_batch_norm_statistics",
    "pvt",
    "registry",
]
