"""HAFA: Hierarchy Aware Feature Aggregation for hierarchical vision transformers (ICCV 2023).

`import hafa` registers the HAFA backbones with timm: timm.create_model("hafa_pvt_v2_b1", ...);
`hafa.convert(timm_model)` makes the HAFA form of a timm hierarchical model; `hafa.HafaOptions` holds
its choices (transitions, cluster ratio, ...).
"""

from . import models
from .checkpoint import LoadReport
from .layers import HafaOptions
from .models import convert
from .pretrained import CheckpointMismatchError, load_pretrained

__version__ = "0.1.0"
__all__ = ["models", "convert", "HafaOptions", "load_pretrained", "LoadReport", "CheckpointMismatchError"]
