"""Model sizes: ours (exact, checked by the tests so that a change in size is a visible decision), the
authors' official code's (where it exists) and the paper's (Tables 1 and 6), with the baseline each
HAFA model is compared against (BASELINE, from the registry: hafa_<name> against <name>)."""

from .registry import BASELINE

__all__ = ["PARAMS", "BASELINE", "OFFICIAL", "PAPER"]

# Parameters at num_classes=1000, default arguments.
PARAMS = {
    "pvt_tiny": 13229288,
    "pvt_small": 24485864,
    "pvt_medium": 44208104,
    "pvt_large": 61369320,
    "hafa_pvt_tiny": 14633720,
    "hafa_pvt_small": 25890296,
    "hafa_pvt_medium": 45612536,
    "hafa_pvt_large": 62773752,
    "hafa_pvt_v2_b0": 3837484,
    "hafa_pvt_v2_b1": 14645324,
    "hafa_pvt_v2_b2": 25999180,
    "hafa_pvt_v2_b3": 45875020,
    "hafa_pvt_v2_b4": 63192396,
    "hafa_pvt_v2_b5": 82592332,
    "hafa_pvt_v2_b2_li": 23189836,
    "hafa_swin_tiny_patch4_window7_224": 29494850,
    "hafa_swin_small_patch4_window7_224": 50812754,
    "hafa_swin_base_patch4_window7_224": 89901168,
}

# The authors' public code (PVT v1 classification only): its parameters that the forward pass uses
# (not its dead cls_token, norm4 and proj_q), in M.
OFFICIAL = {
    "hafa_pvt_tiny": 14.63,
    "hafa_pvt_small": 25.89,
    "hafa_pvt_large": 62.77,
}

# The paper's (#params in M, GFLOPs at 224, ImageNet top-1 %), Tables 1 and 6. Its parameter counts are
# cut (not rounded) to one decimal: 14.63 M prints as 14.6.
PAPER = {
    "pvt_tiny": (13.2, 1.9, 75.1),
    "hafa_pvt_tiny": (14.6, 1.9, 77.5),
    "pvt_small": (24.5, 3.8, 79.8),
    "hafa_pvt_small": (25.8, 3.8, 80.1),
    "pvt_large": (61.4, 9.8, 81.7),
    "hafa_pvt_large": (62.7, 9.8, 82.2),
    "pvt_v2_b1": (14.0, 1.9, 78.7),
    "hafa_pvt_v2_b1": (14.6, 1.9, 79.8),
    "pvt_v2_b2": (25.4, 4.0, 82.0),
    "hafa_pvt_v2_b2": (26.0, 4.0, 82.5),
    "swin_tiny_patch4_window7_224": (30.8, 4.5, 81.3),
    "hafa_swin_tiny_patch4_window7_224": (29.1, 4.5, 81.7),
}
