"""A corpus of ONNX models as users bring them: several exporters and opsets, shared weights, odd layer types,
transformers, external data, and the model-zoo classics' old forms. Every model is small, seeded and built at
run time (``build(name, folder)``), with calibration arrays keyed by input name (samples on axis 0).

Used by ``tests/quant/test_onnx_corpus.py`` and ``benchmarks/onnx_corpus.py``; ``onnx_check.py`` runs a method
on a corpus model and judges the result.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
import torch.nn.functional as F


@dataclass
class CorpusModel:
    name: str
    path: Path
    calib: dict[str, np.ndarray]          # input name -> samples
    kind: str = "cnn"                     # cnn | transformer | rnn | misc
    notes: str = ""
    feeds: dict[str, np.ndarray] = field(default_factory=dict)   # evaluation inputs (defaults to calib)


# ---------------------------------------------------------------------------------------------- models

class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a residual block, global pooling and a Linear (exported as Gemm with transB=1)."""

    def __init__(self, cin: int = 3, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv4, self.bn4 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SharedLinear(nn.Module):
    """One weight read by two layers (the same nn.Linear called twice)."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.out = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.inp(x))
        x = F.relu(self.fc(x))
        return self.out(F.relu(self.fc(x)))


class TokenMLP(nn.Module):
    """Linear on a 3-D input: MatMul + Add in the exported graph."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):                                   # (B, T, 32)
        return self.fc2(F.gelu(self.fc1(x)))


class GroupedConvs(nn.Module):
    """Conv without bias, a grouped conv and a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.g(x))
        x = F.relu(self.dw(x))
        return self.pw(x)


class Deconv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.t = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.o = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.o(F.relu(self.t(F.relu(self.c(x)))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(8, 32, 5, padding=2), nn.Conv1d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):                                   # (B, 8, L)
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(x.mean(-1))


class RNNNet(nn.Module):
    def __init__(self, cell: str):
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(16, 32, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):                                   # (B, T, 16)
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


class UNet(nn.Module):
    """Down, up with Resize (nearest), Concat with the skip."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv2d(3, 16, 3, padding=1)
        self.e2 = nn.Conv2d(16, 32, 3, padding=1)
        self.d1 = nn.Conv2d(48, 16, 3, padding=1)
        self.o = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(F.max_pool2d(a, 2)))
        b = F.interpolate(b, scale_factor=2.0, mode="nearest")
        return self.o(F.relu(self.d1(torch.cat([a, b], 1))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Conv2d(3, 8, 3, padding=1)
        self.vec = nn.Linear(6, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, image, features):
        a = F.relu(self.img(image)).mean((2, 3))
        b = F.relu(self.vec(features))
        return self.head(torch.cat([a, b], 1))


class MeanUnsqueeze(nn.Module):
    """x.mean over space then unsqueeze: ReduceMean/Unsqueeze with attribute axes at opsets < 13/18."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.o = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.c(x))
        s = torch.sigmoid(self.fc(y.mean((2, 3))))        # (B, 16)
        return self.o(y * s.unsqueeze(-1).unsqueeze(-1))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise 3x3, squeeze-excitation, hard-swish, 1x1 project, residual."""

    def __init__(self, c: int, expand: int = 4, se: bool = True):
        super().__init__()
        h = c * expand
        self.expand, self.bn1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.dw, self.bn2 = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, h // 4, 1), nn.ReLU(),
                                nn.Conv2d(h // 4, h, 1), nn.Hardsigmoid()) if se else None
        self.project, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.hardswish(self.bn1(self.expand(x)))
        y = F.hardswish(self.bn2(self.dw(y)))
        if self.se is not None:
            y = y * self.se(y)
        return x + self.bn3(self.project(y))


class MobileNetish(nn.Module):
    """A small MobileNetV3-style network: stem, inverted residuals with SE and hard-swish, classifier."""

    def __init__(self, width: int = 16, blocks: int = 3, classes: int = 10, se: bool = True):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[InvertedResidual(width, 4, se) for _ in range(blocks)])
        self.head = nn.Conv2d(width, 64, 1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(F.hardswish(self.bn(self.stem(x))))
        x = F.hardswish(self.head(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MobileNetV3ish(nn.Module):
    """A MobileNetV3-style network for speed tables: stages of inverted residuals (depthwise 3x3, hard-swish,
    squeeze-excitation in the later stages) at widths 16/24/40/80, strides 2, for 3x128x128 images."""

    def __init__(self, classes: int = 100):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        layers, cin = [], 16
        for width, se in ((16, False), (24, False), (40, True), (80, True)):
            if width != cin:
                layers += [nn.Conv2d(cin, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.Hardswish()]
            layers += [InvertedResidual(width, 4, se), InvertedResidual(width, 4, se)]
            cin = width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, 256, 1)
        self.fc = nn.Linear(256, classes)

    def forward(self, x):
        x = self.blocks(F.hardswish(self.bn(self.stem(x))))
        x = F.hardswish(self.head(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm statistics of a trained network (a fresh one folds to all-zero biases)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


# ---------------------------------------------------------------------------------------------- export

def export_torch(model: nn.Module, args: tuple, path: Path, names: list[str], opset: int | None = None,
            dynamo: bool = False, dynamic: dict | None = None, **kw) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        extra = {} if opset is None else {"opset_version": opset}
        if dynamo:
            torch.onnx.export(model, args, str(path), input_names=names, dynamo=True, verbose=False, **extra, **kw)
        else:
            dyn = dynamic if dynamic is not None else {n: {0: "batch"} for n in names}
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["output"], dynamo=False,
                              dynamic_axes=dyn, **extra, **kw)


def _rand(seed: int, *shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_model(name, cls, inputs: dict[str, tuple], opset=None, dynamo=False, dynamic=None, kind="cnn",
                 notes="", seed=0, init=None, n=32, example_batch=2):
    def build(folder: Path) -> CorpusModel:
        torch.manual_seed(seed)
        model = cls().eval()
        if init is not None:
            init(model)
        calib = {k: _rand(seed + i, n, *shape) for i, (k, shape) in enumerate(inputs.items())}
        args = tuple(torch.from_numpy(v[:example_batch]) for v in calib.values())
        path = folder / f"{name}.onnx"
        export_torch(model, args, path, list(inputs), opset, dynamo, dynamic)
        return CorpusModel(name, path, calib, kind, notes)
    return build


def _cnn(seed=0):
    return lambda m: randomize_bn(m, seed)


def _hf(kind: str):
    def build(folder: Path) -> CorpusModel:
        from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        if kind == "bert":
            model = BertModel(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=64)).eval()
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                               use_cache=False, bos_token_id=0, eos_token_id=0)).eval()
        rng = np.random.default_rng(1)
        ids = rng.integers(0, 500, (32, 16)).astype(np.int64)
        path = folder / f"{kind}.onnx"

        class Wrap(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids):
                out = self.m(input_ids=input_ids)
                return out.logits if hasattr(out, "logits") else out.last_hidden_state

        if kind == "bert":
            export_torch(Wrap(model), (torch.from_numpy(ids[:2]),), path, ["input_ids"], 17,
                    dynamic={"input_ids": {0: "batch", 1: "seq"}})
        else:     # the TorchScript exporter cannot export transformers 5's GPT-2 (aten::diff)
            export_torch(Wrap(model), (torch.from_numpy(ids[:2]),), path, ["input_ids"], None, dynamo=True,
                    dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}})
        return CorpusModel(kind, path, {"input_ids": ids}, "transformer",
                           "transformers, " + ("TorchScript exporter" if kind == "bert" else "dynamo exporter"))
    return build


def _external_data(folder: Path) -> CorpusModel:
    m = _torch_model("external_data", SmallCNN, {"input": (3, 16, 16)}, 17, init=_cnn(3))(folder)
    model = onnx.load(str(m.path))
    onnx.save(model, str(m.path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external_data.onnx.data", size_threshold=0)
    m.notes = "weights in external data file"
    return m


def _fixed_batch(folder: Path) -> CorpusModel:
    m = _torch_model("fixed_batch1", SmallCNN, {"input": (3, 16, 16)}, 17, init=_cnn(4), dynamic={},
                     example_batch=1)(folder)
    m.notes = "input shape (1, 3, 16, 16): calibrated sample by sample"
    return m


def _dynamic_spatial(folder: Path) -> CorpusModel:
    return _torch_model("dynamic_hw", SmallCNN, {"input": (3, 16, 16)}, 17, init=_cnn(5),
                        dynamic={"input": {0: "batch", 2: "h", 3: "w"}},
                        notes="dynamic batch and spatial axes")(folder)


def _zoo_classic(opset: int) -> Callable[[Path], CorpusModel]:
    """A model-zoo classic as published: IR version 3, every initializer also a graph input, a bias computed by
    a ConstantOfShape subgraph (opset >= 9) and a weight computed by Reshape of an initializer, BatchNorm."""

    def build(folder: Path) -> CorpusModel:
        rng = np.random.default_rng(opset)
        w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
        b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
        gamma, beta = (rng.random(8) + 0.5).astype(np.float32), (rng.standard_normal(8) * 0.1).astype(np.float32)
        mean, var = (rng.standard_normal(8) * 0.1).astype(np.float32), (rng.random(8) + 0.5).astype(np.float32)
        w2 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
        fc = (rng.standard_normal((10 * 16 * 4 * 4,)) * 0.05).astype(np.float32)
        inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "conv1_w"), (b1, "conv1_b"), (gamma, "bn_gamma"),
                 (beta, "bn_beta"), (mean, "bn_mean"), (var, "bn_var"), (w2, "conv2_w"), (fc, "fc_w_flat"),
                 (np.array([10, 256], np.int64), "fc_shape"), ((rng.standard_normal(10) * 0.1).astype(np.float32), "fc_b")]]
        bn_attrs = {"epsilon": 1e-5} if opset >= 7 else {"epsilon": 1e-5, "is_test": 1}
        nodes = [helper.make_node("Conv", ["data", "conv1_w", "conv1_b"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                 helper.make_node("BatchNormalization", ["c1", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["bn1"], **bn_attrs),
                 helper.make_node("Relu", ["bn1"], ["r1"]),
                 helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2])]
        conv2_inputs = ["p1", "conv2_w"]
        if opset >= 9:
            inits.append(numpy_helper.from_array(np.array([16], np.int64), "conv2_b_shape"))
            nodes.append(helper.make_node("ConstantOfShape", ["conv2_b_shape"], ["conv2_b"],
                                          value=numpy_helper.from_array(np.array([0.05], np.float32))))
            conv2_inputs.append("conv2_b")
        nodes += [helper.make_node("Conv", conv2_inputs, ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c2"], ["r2"]),
                  helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
                  helper.make_node("Flatten", ["p2"], ["flat"], axis=1)]
        if opset >= 5:
            nodes.append(helper.make_node("Reshape", ["fc_w_flat", "fc_shape"], ["fc_w"]))
        nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1, **({"broadcast": 1} if opset < 7 else {})))
        graph_inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 16, 16])]
        graph_inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
        graph = helper.make_graph(nodes, "zoo_classic", graph_inputs,
                                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="zoo")
        model.ir_version = 3
        path = folder / f"zoo_opset{opset}.onnx"
        onnx.save(model, str(path))
        return CorpusModel(f"zoo_opset{opset}", path, {"data": _rand(opset, 32, 3, 16, 16)}, "cnn",
                           f"IR 3, opset {opset}, initializers as inputs, fixed batch 1")
    return build


_IMG = {"input": (3, 16, 16)}

BUILDERS: dict[str, Callable[[Path], CorpusModel]] = {
    "cnn_opset11": _torch_model("cnn_opset11", SmallCNN, _IMG, 11, init=_cnn(11)),
    "cnn_opset12": _torch_model("cnn_opset12", SmallCNN, _IMG, 12, init=_cnn(12)),
    "cnn_opset13": _torch_model("cnn_opset13", SmallCNN, _IMG, 13, init=_cnn(13)),
    "cnn_opset17": _torch_model("cnn_opset17", SmallCNN, _IMG, 17, init=_cnn(17)),
    "cnn_default": _torch_model("cnn_default", SmallCNN, _IMG, None, init=_cnn(1), notes="TorchScript exporter, default opset"),
    "cnn_dynamo": _torch_model("cnn_dynamo", SmallCNN, _IMG, None, dynamo=True, init=_cnn(2), notes="dynamo exporter"),
    "cnn_fresh_bn": _torch_model("cnn_fresh_bn", SmallCNN, _IMG, 17,
                                 notes="fresh BatchNorm: folded all-zero biases deduplicated into one initializer"),
    "shared_linear": _torch_model("shared_linear", SharedLinear, {"input": (32,)}, 17, kind="misc",
                                  notes="one Gemm weight read by two layers"),
    "matmul_add": _torch_model("matmul_add", TokenMLP, {"input": (8, 32)}, 17, kind="misc", notes="MatMul + Add"),
    "grouped_convs": _torch_model("grouped_convs", GroupedConvs, _IMG, 17, notes="no bias, grouped, depthwise"),
    "conv_transpose": _torch_model("conv_transpose", Deconv, _IMG, 17),
    "conv1d": _torch_model("conv1d", Conv1dNet, {"input": (8, 24)}, 17),
    "lstm": _torch_model("lstm", lambda: RNNNet("lstm"), {"input": (6, 16)}, 17, kind="rnn"),
    "gru": _torch_model("gru", lambda: RNNNet("gru"), {"input": (6, 16)}, 17, kind="rnn"),
    "unet": _torch_model("unet", UNet, _IMG, 17, notes="Resize + Concat"),
    "two_inputs": _torch_model("two_inputs", TwoInputs, {"image": (3, 16, 16), "features": (6,)}, 17, kind="misc"),
    "reduce_mean_opset11": _torch_model("reduce_mean_opset11", MeanUnsqueeze, _IMG, 11,
                                        notes="ReduceMean/Unsqueeze with attribute axes"),
    "mobilenet_se": _torch_model("mobilenet_se", MobileNetish, _IMG, 17, init=_cnn(7),
                                 notes="inverted residuals, depthwise, SE, hard-swish"),
    "mobilenet_v3ish": _torch_model("mobilenet_v3ish", MobileNetV3ish, {"input": (3, 128, 128)}, 17, init=_cnn(8),
                                    notes="MobileNetV3-style, 128x128: the speed table's edge CNN", n=64),
    "dynamic_hw": _dynamic_spatial,
    "fixed_batch1": _fixed_batch,
    "external_data": _external_data,
    "zoo_opset7": _zoo_classic(7),
    "zoo_opset8": _zoo_classic(8),
    "zoo_opset9": _zoo_classic(9),
    "zoo_opset6": _zoo_classic(6),
    "bert": _hf("bert"),
    "gpt2": _hf("gpt2"),
}


def build(name: str, folder: str | os.PathLike) -> CorpusModel:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](folder)
