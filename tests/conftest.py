import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in Triton's interpreter (tests/test_kernels.py); it must be on
    # before any kernel is defined, i.e. before hafa's kernel modules are first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
