"""Weight-only quantization (round to nearest) and half-precision conversion, for PyTorch modules and ONNX.

PyTorch: Conv2d/Linear layers are swapped in a copy of the model for twins that hold the weight grid
(``modules.QuantConv2d``/``QuantLinear``) or compute in half precision (``HalfPrecision``); no tracing, so it
works on any module, Hugging Face models included. ONNX: the weights of Conv/Gemm/MatMul are stored
quantized (int4/int8/FP8) or in half precision and rebuilt in front of the layer.
"""
from __future__ import annotations

import copy
import os
import time


import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from smallify import onnx_io
from smallify.quant import modules as qmod
from smallify.quant.config import Float16, WeightOnly
from smallify.quant.onnx import check_model, compact, needed_opset, preprocess, save_onnx
from smallify.quant.onnx_graph import check_finite_weights, drop_unused_initializers, weight_layers
from smallify.quant.onnx_weights import quantize_weights
from smallify.quant.report import LayerReport, QuantReport

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class HalfPrecision(nn.Module):
    """A layer that computes in fp16/bf16: float32 in, cast to half, the layer, cast back to float32."""

    def __init__(self, layer: nn.Module, dtype: str):
        super().__init__()
        self.dtype = dtype
        self.layer = copy.deepcopy(layer).to(HALF[dtype])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(HALF[self.dtype])).to(x.dtype)

    def extra_repr(self) -> str:
        return self.dtype


def _weight_layers(model: nn.Module):
    for name, m in model.named_modules():
        twin = qmod.lookup(m)
        if twin is not None:
            yield name, m, twin


def unhandled_layers(model: nn.Module, what: str) -> list[LayerReport]:
    """Every module holding its own parameters that has no twin (LayerNorm, Embedding, custom layers), as a
    float layer with the reason: the report never says 'nothing left in float' while a weight stayed float."""
    reports = []
    for name, m in model.named_modules():
        if qmod.lookup(m) is None and not isinstance(m, (qmod.QuantTwin, HalfPrecision)) \
                and any(True for _ in m.parameters(recurse=False)):
            op = type(m).__name__ if name else "Parameter"
            reports.append(LayerReport(name or ", ".join(n for n, _ in m.named_parameters(recurse=False)), op, "float",
                                       f"{op} has no {what} implementation (handled: {', '.join(qmod.handled_names())})"))
    return reports


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each BatchNorm folded into the convolution before it (what every runtime and
    the ONNX exporter do), so that the weights quantized are the weights that run; models that torch.fx
    cannot trace (e.g. Hugging Face transformers, which have no BatchNorm) are copied as they are."""
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        return fuse(model)
    except Exception:
        return model


def weight_only_module(model: nn.Module, config: WeightOnly) -> nn.Module:
    """A copy of ``model`` with its Conv2d/Linear weights on ``config``'s grid; ``quant_report`` lists each."""
    model = fold_batchnorm(model)
    reports, start = [], time.perf_counter()
    for name, m, twin in list(_weight_layers(model)):
        spec = config.weight_spec(twin.float_weight(m).shape[1], name)
        if spec.fmt is None:
            pattern = config.skip_pattern(name)
            reports.append(LayerReport(name, type(m).__name__, "float",
                                       f"skipped by pattern {pattern!r}" if pattern else "layer_bits: float"))
            continue
        qmod.replace_module(model, name, twin.from_float(m, spec))
        reports.append(LayerReport(name, type(m).__name__, "quantized", spec.describe()))
    reports += unhandled_layers(model, "weight-only")
    model.quant_config = config
    model.quant_report = model.report = QuantReport(config.to_dict(), reports, 0, 0, time.perf_counter() - start,
                                                    "weight-only")
    return model


def half_module(model: nn.Module, config: Float16) -> nn.Module:
    """A copy of ``model`` whose selected Conv2d/Linear layers compute in ``config.dtype``."""
    model = fold_batchnorm(model)
    reports = []
    for name, m, _ in list(_weight_layers(model)):
        if config.selects(name):
            qmod.replace_module(model, name, HalfPrecision(m, config.dtype))
            reports.append(LayerReport(name, type(m).__name__, "quantized", config.dtype))
        else:
            reports.append(LayerReport(name, type(m).__name__, "float", "not selected by layers/skip"))
    reports += unhandled_layers(model, config.dtype)
    model.quant_config = config
    model.quant_report = model.report = QuantReport(config.to_dict(), reports, 0, 0, 0.0, config.dtype)
    return model


def weight_only_onnx(model: onnx.ModelProto, config: WeightOnly) -> tuple[onnx.ModelProto, QuantReport]:
    """Weight-only quantization of an ONNX graph: DequantizeLinear (int4/uint4 blocks, int8) in front of each
    layer; ONNX Runtime turns DequantizeLinear(int4 blocks) + MatMul into its MatMulNBits kernel."""

    start = time.perf_counter()
    gemm_to_matmul(model)
    reports, specs = [], {}
    for node, w_idx, name, in_ch in weight_layers(model):
        spec = config.weight_spec(in_ch, name, node.input[w_idx])
        specs[node.input[w_idx]] = spec
        reports.append(LayerReport(name, node.op_type, "float" if spec.fmt is None else "quantized",
                                   "skipped" if spec.fmt is None else spec.describe()))
    quantize_weights(model, lambda name, wname, _: specs.get(wname), static=False)
    return model, QuantReport(config.to_dict(), reports, 0, 0, time.perf_counter() - start, "weight-only")


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm with a constant weight read by it alone (alpha = beta = 1, no transA) as MatMul with
    the weight in [K, N] layout, plus Add of the bias: ONNX Runtime fuses blocked int4 DequantizeLinear +
    MatMul into its MatMulNBits kernel, and a Gemm into nothing. The weight keeps its name. Returns the count."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    nodes, count = [], 0
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w = inits.get(n.input[1]) if n.op_type == "Gemm" and len(n.input) > 1 else None
        if w is None or readers[w.name] != 1 or len(w.dims) != 2 or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(n)
            continue
        if attrs.get("transB", 0):
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))
        out = n.output[0]
        has_bias = len(n.input) > 2 and n.input[2]
        nodes.append(helper.make_node("MatMul", [n.input[0], w.name], [f"{out}:mm" if has_bias else out], name=n.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [f"{out}:mm", n.input[2]], [out]))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    return count


def half_onnx(model: onnx.ModelProto, config: Float16) -> tuple[onnx.ModelProto, QuantReport]:
    """Store the selected layers' weights (and biases) in fp16/bf16, each followed by a Cast to float32."""
    reports = store_half(model, config.dtype, config.selects)
    return model, QuantReport(config.to_dict(), reports, 0, 0, 0.0, config.dtype)


def store_half(model: onnx.ModelProto, half: str, selects) -> list[LayerReport]:
    """``half_onnx`` for the layers where ``selects(layer name, weight name)`` holds."""
    dtype = TensorProto.FLOAT16 if half == "fp16" else TensorProto.BFLOAT16
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    reports, casts, done = [], [], set()
    for node, w_idx, name, _ in list(weight_layers(model)):
        if not selects(name, node.input[w_idx]):
            reports.append(LayerReport(name, node.op_type, "float", "not selected by layers/skip"))
            continue
        for i in ([w_idx] + ([2] if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 else [])):
            t = node.input[i]
            if t not in inits or inits[t].data_type != TensorProto.FLOAT:
                continue
            if t not in done:
                a = torch.from_numpy(numpy_helper.to_array(inits[t]).copy())
                h = a.to(HALF[half])
                raw = h.view(torch.int16).numpy().tobytes()
                g.initializer.append(helper.make_tensor(f"{t}:h", dtype, list(a.shape), raw, raw=True))
                casts.append(helper.make_node("Cast", [f"{t}:h"], [f"{t}:f"], to=TensorProto.FLOAT))
                done.add(t)
            node.input[i] = f"{t}:f"
        reports.append(LayerReport(name, node.op_type, "quantized", half))
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)

    drop_unused_initializers(model)
    return reports


def convert_onnx(model_or_path, config, out: str | os.PathLike | None = None):
    """The ONNX entry for the configs that need no calibration (WeightOnly, Float16)."""

    if out is not None:
        onnx_io.check_writable(out)
    model = onnx_io.load(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else copy.deepcopy(model_or_path)
    model = preprocess(model, needed_opset(config))
    check_finite_weights(model, (lambda n, w: config.selects(n, w)) if isinstance(config, Float16)
                         else (lambda n, w: config.skip_pattern(n, w) is None))
    model, report = (weight_only_onnx if isinstance(config, WeightOnly) else half_onnx)(model, config)
    model.producer_name = "smallify"
    compact(model)
    check_model(model)
    if out is not None:
        save_onnx(model, out)
    return model, report



