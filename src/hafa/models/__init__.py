"""HAFA backbones, registered with timm on import."""

from .pvt import HafaPvt
from .pvt_v2 import HafaPvtV2
from .swin import HafaSwin

__all__ = ["HafaPvt", "HafaPvtV2", "HafaSwin"]
