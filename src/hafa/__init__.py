"""HAFA: Hierarchy Aware Feature Aggregation for hierarchical vision transformers (ICCV 2023)."""
__version__ = "0.1.0"
