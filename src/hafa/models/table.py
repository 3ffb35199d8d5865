"""Model sizes: ours (exact, checked by the tests so that a change in size is a visible decision)
and the paper's (Tables 1 and 6), with the baseline each HAFA model is compared against."""

# Parameters at num_classes=1000, default stage_aggregation.
PARAMS = {
    "pvt_tiny": 13229288,
    "pvt_small": 24485864,
    "pvt_medium": 44208104,
    "pvt_large": 61369320,
    "hafa_pvt_tiny": 14366584,
    "hafa_pvt_small": 25623160,
    "hafa_pvt_medium": 45345400,
    "hafa_pvt_large": 62506616,
    "hafa_pvt_v2_b0": 3769196,
    "hafa_pvt_v2_b1": 14377676,
    "hafa_pvt_v2_b2": 25731532,
    "hafa_pvt_v2_b3": 45607372,
    "hafa_pvt_v2_b4": 62924748,
    "hafa_pvt_v2_b5": 82324684,
    "hafa_pvt_v2_b2_li": 22922188,
    "hafa_swin_tiny_patch4_window7_224": 30365378,
    "hafa_swin_small_patch4_window7_224": 51683282,
    "hafa_swin_base_patch4_window7_224": 91455088,
}

# The timm (or our PVT v1) baseline of each HAFA model.
BASELINE = {
    **{f"hafa_pvt_{size}": f"pvt_{size}" for size in ("tiny", "small", "medium", "large")},
    **{f"hafa_pvt_v2_{b}": f"pvt_v2_{b}" for b in ("b0", "b1", "b2", "b3", "b4", "b5", "b2_li")},
    **{f"hafa_swin_{size}_patch4_window7_224": f"swin_{size}_patch4_window7_224" for size in ("tiny", "small", "base")},
}

# The paper's (#params in M, GFLOPs at 224, ImageNet top-1 %), Tables 1 and 6.
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
