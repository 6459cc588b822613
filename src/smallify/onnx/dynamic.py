"""Dynamic INT8 on ONNX graphs (no data): MatMul/Gemm with constant weights become
DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, which ONNX Runtime fuses into DynamicQuantizeMatMul.
The PyTorch twin and config live in ``smallify/quant/dynamic.py``."""
from __future__ import annotations

import copy
import os
import time

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from smallify.onnx import io as onnx_io
from smallify.quant import modules as qmod
from smallify.quant.dynamic import Int8Dynamic
from smallify.quant.report import LayerReport, QuantReport


def quantize_dynamic_matmuls(model: onnx.ModelProto, spec_for, stored: dict | None = None) -> list[str]:
    """Rewrite MatMul/Gemm nodes with a constant 2-D weight as dynamic INT8 (see the module docstring).
    ``spec_for(layer name, weight name)`` -> WeightSpec or None (leave the layer); ``stored``: weight name ->
    (values, scale, zero) from PyTorch twins. Returns the layer names rewritten."""
    from smallify.onnx.graph import (
        constants,
        drop_unused_initializers,
        layer_name,
        weight_axes,
        weight_input,
    )
    from smallify.onnx.weights import unique_prefix

    g = model.graph
    consts = constants(model)
    inits = {i.name for i in g.initializer}
    nodes, done = [], []
    made: dict[tuple, str] = {}     # a weight read by several layers: one quantized copy
    for node in g.node:
        w_idx = weight_input(node, consts)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = node.op_type in ("MatMul", "Gemm") and w_idx == 1 and node.input[1] in inits and \
            consts[node.input[1]].ndim == 2 and attrs.get("transA", 0) == 0 and \
            attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        name = layer_name(node, consts)
        spec = spec_for(name, node.input[1]) if ok else None
        if spec is None:
            nodes.append(node)
            continue
        wname, out = node.input[1], node.output[0]
        _, transposed = weight_axes(node)
        w = torch.from_numpy(consts[wname].astype(np.float32))
        wt = w.T if transposed else w                      # PyTorch layout [N, K]
        if stored is not None and wname in stored:
            values, scale, _ = stored[wname]
        else:
            scale, zero = qmod.weight_params(wt, spec)
            values = qmod.weight_values(wt, spec, scale, zero)
        n_out = wt.shape[0]
        scale = scale.detach().float().reshape(-1)
        scale = scale.expand(n_out) if scale.numel() == 1 else scale
        key = (wname, transposed, repr(spec))
        if key not in made:
            made[key] = p = unique_prefix(model, wname)
            g.initializer.extend([
                numpy_helper.from_array(values.T.numpy().astype(np.int8), f"{p}:q"),            # [K, N]
                numpy_helper.from_array(np.zeros(n_out, np.int8), f"{p}:zp"),
                numpy_helper.from_array(scale.numpy().astype(np.float32), f"{p}:s")])
        p = made[key]
        x = node.input[0]
        nodes += [helper.make_node("DynamicQuantizeLinear", [x], [f"{out}:xq", f"{out}:xs", f"{out}:xz"]),
                  helper.make_node("MatMulInteger", [f"{out}:xq", f"{p}:q", f"{out}:xz", f"{p}:zp"],
                                   [f"{out}:i32"]),
                  helper.make_node("Cast", [f"{out}:i32"], [f"{out}:f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{out}:xs", f"{p}:s"], [f"{out}:s"])]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        nodes.append(helper.make_node("Mul", [f"{out}:f", f"{out}:s"], [f"{out}:nb" if has_bias else out]))
        if has_bias:
            nodes.append(helper.make_node("Add", [f"{out}:nb", node.input[2]], [out]))
        done.append(name)
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(model)
    return done


def dynamic_onnx(model_or_path, config: Int8Dynamic, out: str | os.PathLike | None = None):
    """Dynamic INT8 for an ONNX model (no data); embedding tables become int8 as in the static path."""
    from smallify.onnx.graph import check_finite_weights, weight_layers
    from smallify.onnx.io import check_model, save_onnx
    from smallify.onnx.prepare import preprocess
    from smallify.onnx.quantize import compact
    from smallify.onnx.weights import quantize_embeddings

    if out is not None:
        onnx_io.check_writable(out)
    start = time.perf_counter()
    model = onnx_io.load(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else copy.deepcopy(model_or_path)
    model = preprocess(model)
    dynamic_ops = {node.input[w] for node, w, _, _ in weight_layers(model) if node.op_type in ("MatMul", "Gemm")}
    check_finite_weights(model, lambda n, w: w in dynamic_ops and config.skip_pattern(n, w) is None)
    names = [(name, node.op_type, node.input[w]) for node, w, name, _ in weight_layers(model)]
    spec = qmod.WeightSpec(config.weight_format, config.per_channel)
    done = set(quantize_dynamic_matmuls(model, lambda name, wname: None if config.skip_pattern(name, wname) else spec))
    reports = [LayerReport(name, op, "quantized" if name in done else "float",
                           "int8 weights, dynamic uint8 activations" if name in done else
                           (f"skipped by pattern {config.skip_pattern(name, w)!r}" if config.skip_pattern(name, w)
                            else f"{op} has no dynamic INT8 form (handled: MatMul, Gemm)"))
               for name, op, w in names]
    for table in quantize_embeddings(model):
        reports.append(LayerReport(table, "Gather", "quantized", "embedding table: weight-only int8 per row"))
    model.producer_name = "smallify"
    compact(model)
    check_model(model)
    if out is not None:
        save_onnx(model, out)
    return model, QuantReport(config.to_dict(), reports, 0, 0, time.perf_counter() - start, "dynamic")
