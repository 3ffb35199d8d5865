"""HAFA's layers: LAA and SIA downsampling, and attention over separate queries and keys/values."""

from .attention import Attention, Block, DepthwiseConvMlp, pvt_block, spatial_reduction_attention
from .laa import (
    LAA,
    LAA_LAYERS,
    ConvDownsample,
    DeformableConv2d,
    LAAPatchMerging,
    batch_norm_act,
    check_laa_norm,
    deformable_conv,
    deformable_samples,
    sampling_positions,
)
from .options import AGGREGATIONS, BASELINE_AGGREGATION, HAFA_AGGREGATION, LAA_NORMS, HafaOptions
from .sia import SIA, SIAOutput

__all__ = [
    "HafaOptions",
    "AGGREGATIONS",
    "BASELINE_AGGREGATION",
    "HAFA_AGGREGATION",
    "LAA",
    "LAA_LAYERS",
    "LAA_NORMS",
    "DeformableConv2d",
    "LAAPatchMerging",
    "batch_norm_act",
    "check_laa_norm",
    "ConvDownsample",
    "SIA",
    "SIAOutput",
    "Attention",
    "Block",
    "DepthwiseConvMlp",
    "pvt_block",
    "spatial_reduction_attention",
    "deformable_conv",
    "deformable_samples",
    "sampling_positions",
]
