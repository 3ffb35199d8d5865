"""HAFA: Hierarchy Aware Feature Aggregation for hierarchical vision transformers (ICCV 2023).

`import hafa` registers the HAFA backbones with timm: timm.create_model("hafa_pvt_v2_b1", ...);
`hafa.convert(timm_model)` makes the HAFA form of a timm hierarchical model.
"""

from . import models
from .checkpoint import LoadReport
from .models import convert
from .pretrained import CheckpointMismatchError, load_pretrained

__version__ = "0.1.0"
__all__ = ["models", "convert", "load_pretrained", "LoadReport", "CheckpointMismatchError"]
