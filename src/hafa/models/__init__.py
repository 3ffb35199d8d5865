"""HAFA backbones, registered with timm on import."""

from ._base import freeze_batch_norm_statistics
from .pvt import HafaPvt
from .pvt_v2 import HafaPvtV2
from .swin import HafaSwin

__all__ = ["HafaPvt", "HafaPvtV2", "HafaSwin", "freeze_batch_norm_statistics"]
