"""Weight-only and half-precision storage on ONNX graphs (no data): blocked int4/int8 DequantizeLinear in
front of each layer (ONNX Runtime: MatMulNBits), or fp16/bf16 weights followed by a Cast. The PyTorch side
lives in ``smallify/quant/weight_only.py``."""
from __future__ import annotations

import copy
import os
import time

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from smallify.onnx import io as onnx_io
from smallify.onnx.graph import (
    check_finite_weights,
    drop_unused_initializers,
    weight_layers,
)
from smallify.onnx.io import check_model, save_onnx
from smallify.onnx.prepare import preprocess
from smallify.onnx.quantize import compact, needed_opset
from smallify.onnx.weights import quantize_weights
from smallify.quant.config import Float16, WeightOnly
from smallify.quant.report import LayerReport, QuantReport
from smallify.quant.weight_only import HALF


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
