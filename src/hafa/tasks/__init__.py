"""Training and evaluation tasks: classification, segmentation, detection."""
