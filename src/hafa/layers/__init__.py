"""HAFA's layers: LAA and SIA downsampling, and attention over separate queries and keys/values."""

from .attention import Attention, Block, DepthwiseConvMlp
from .laa import LAA, LAA_NORMS, ConvDownsample, batch_norm_act, check_laa_norm, deformable_samples, sampling_positions
from .sia import SIA, SIAOutput

__all__ = [
    "LAA",
    "LAA_NORMS",
    "batch_norm_act",
    "check_laa_norm",
    "ConvDownsample",
    "SIA",
    "SIAOutput",
    "Attention",
    "Block",
    "DepthwiseConvMlp",
    "deformable_samples",
    "sampling_positions",
]
