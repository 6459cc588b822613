"""Fashion-MNIST from the standard IDX files (no download: the files must be on disk).

On Debian/Ubuntu: ``apt-get install -y dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist/``. Any folder holding the four standard files works
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ``.gz``).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from smallify.errors import DataError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # of the training images, on the [0, 1] scale
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the data set with "
        "`apt-get install -y dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist/), "
        "or pass a folder holding the four standard IDX files (set SMALLIFY_FASHION_MNIST or root=...).")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


def load(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``split`` ('train' or 'test')."""
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}; accepted: 'train', 'test'")
    root = Path(root or os.environ.get("SMALLIFY_FASHION_MNIST") or DEFAULT_ROOT)
    images = _read_idx(_find(root, _FILES[split][0]))
    labels = _read_idx(_find(root, _FILES[split][1])).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in split {split!r}")
    return images, labels


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), standardized as the bundled model expects."""
    x = images.astype(np.float32)[:, None] / 255.0
    return (x - MEAN) / STD
