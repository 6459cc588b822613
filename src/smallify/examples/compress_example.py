"""The bundled example's pieces for ``smallify compress``: the metric the search chooses by (top-1 in percent
on the last 5,000 Fashion-MNIST training images, which distillation never sees), the metric reported (top-1 on
the 10,000 test images), and the distillation data (the first 55,000 training images, shifted and flipped).
Module-level functions, so that worker processes can import them."""
from __future__ import annotations

import functools

import numpy as np

from smallify.examples import fashion_mnist

HELD_OUT = 5000


@functools.lru_cache(maxsize=2)
def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = fashion_mnist.load("train" if split != "test" else "test")
    x = fashion_mnist.normalize(x)
    if split == "heldout":
        return x[-HELD_OUT:], y[-HELD_OUT:]
    if split == "train":
        return x[:-HELD_OUT], y[:-HELD_OUT]
    return x, y


def onnx_top1(path, x: np.ndarray, y: np.ndarray, threads: int = 2, batch: int = 500) -> float:
    """Top-1 in percent of the ONNX classifier at ``path`` on (x, y), in ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = sum(int((session.run(None, {name: x[i:i + batch]})[0].argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def heldout_top1(path) -> float:
    """The search's metric: top-1 (%) on the last 5,000 training images."""
    return onnx_top1(path, *_split("heldout"))


def test_top1(path) -> float:
    """The reported metric: top-1 (%) on the 10,000 test images."""
    return onnx_top1(path, *_split("test"))


def train_data(n: int | None = None, batch_size: int = 128):
    """The first 55,000 training images (or the first ``n``) with labels, shifted and flipped per batch."""
    import smallify as sm
    from smallify.examples.train_fmnist import augment

    x, y = _split("train")
    return sm.TrainData(x[:n], y[:n], batch_size=batch_size, augment=augment)


def minilm_cosine(path) -> float:
    """MiniLM-L6's metric for compress: mean cosine between the ONNX model's sentence embeddings and the float
    model's, on the tokenized sentences and reference embeddings in the .npz named by $SMALLIFY_MINILM_REF."""
    import os

    import onnxruntime as ort

    from smallify.examples.minilm import mean_cosine

    data = np.load(os.environ["SMALLIFY_MINILM_REF"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = np.concatenate([session.run(None, {k: data[k][i:i + 32] for k in names})[0]
                          for i in range(0, len(data["reference"]), 32)])
    return mean_cosine(data["reference"], out)
