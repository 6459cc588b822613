"""Small models and metrics for the compress tests; module level, so that worker processes can import them.
The metric is 100 x the mean cosine between a candidate's ONNX outputs and the float model's outputs on fixed
inputs (read from the .npz named by $TINY_COMPRESS_REF)."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    m = TinyCNN()
    for bn in (m.body[1], m.body[4]):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP().eval()


def write_reference(model: nn.Module, x: np.ndarray, path) -> None:
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.savez(path, x=x, ref=ref)


def cosine(path) -> float:
    import onnxruntime as ort

    data = np.load(os.environ["TINY_COMPRESS_REF"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
    ref = data["ref"]
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    return float(100 * cos.mean())


def raises(path) -> float:
    raise RuntimeError("the evaluation set is missing")


def not_a_number(path):
    return "good"


def strict(path) -> float:
    """The cosine metric less 100 x the largest absolute output error: any change at all costs something."""
    import onnxruntime as ort

    data = np.load(os.environ["TINY_COMPRESS_REF"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
    return cosine(path) - 100 * float(np.abs(out - data["ref"]).max())
