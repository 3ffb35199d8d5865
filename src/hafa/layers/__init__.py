"""HAFA's layers: LAA and SIA downsampling, and attention over separate queries and keys/values."""

from .attention import Attention, Block, DepthwiseConvMlp
from .laa import LAA, ConvDownsample, deformable_samples, sampling_positions
from .sia import SIA, SIAOutput

__all__ = [
    "LAA",
    "ConvDownsample",
    "SIA",
    "SIAOutput",
    "Attention",
    "Block",
    "DepthwiseConvMlp",
    "deformable_samples",
    "sampling_positions",
]
