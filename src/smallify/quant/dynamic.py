"""Dynamic INT8 quantization of Linear/MatMul layers: int8 weights (per output channel) fixed ahead of time,
activations quantized on the fly per tensor (uint8, asymmetric) from each input's own range, so no
calibration data is needed. The ONNX form is the one ONNX Runtime fuses into DynamicQuantizeMatMul:

    x -> DynamicQuantizeLinear -> MatMulInteger(x_q, W_q int8, x_zp, 0) -> Cast -> Mul(x_scale * w_scale) [-> Add(bias)]
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from smallify import onnx_io
from smallify.config import Config
from smallify.quant import modules as qmod
from smallify.quant.primitives import INT8_WEIGHT, UINT8_ACT, compute_qparams, fake_quantize
from smallify.quant.report import LayerReport, QuantReport


@dataclasses.dataclass
class Int8Dynamic(Config):
    """INT8 weights (symmetric, per output channel unless ``per_channel=False``) and activations quantized at
    run time from their own range: no calibration. For Linear-heavy models (transformers, RNN heads); ``skip``:
    fnmatch patterns of layers kept in float."""

    kind = "int8_dynamic"
    verbs = ("quantize",)
    per_channel: bool = True
    skip: tuple[str, ...] = ()
    reduce_range: bool | str = "auto"     # 7-bit weights where the CPU's integer kernels saturate (Int8Static)

    def __post_init__(self):
        from smallify.quant.config import patterns, resolve_reduce_range

        self.skip = patterns("skip", self.skip)
        self.reduce_range = resolve_reduce_range(self.reduce_range)

    @property
    def weight_format(self):
        from smallify.quant.primitives import IntFormat

        return IntFormat(7) if self.reduce_range else INT8_WEIGHT

    def skip_pattern(self, *names: str) -> str | None:
        from smallify.quant.config import _first_match

        return _first_match(self.skip, names)


def dynamic_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """What DynamicQuantizeLinear + DequantizeLinear compute: uint8 over the whole tensor's range (with 0)."""
    scale, zero = compute_qparams(x.detach().min(), x.detach().max(), UINT8_ACT)
    return fake_quantize(x, scale, zero, UINT8_ACT)


class DynamicQuantLinear(qmod.QuantLinear):
    """A Linear with int8 weights whose input is quantized per call from its own range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(dynamic_fake_quantize(x), self.qweight(), self.bias)


def dynamic_module(model: nn.Module, config: Int8Dynamic) -> nn.Module:
    """A copy of ``model`` whose nn.Linear layers (not skipped) are dynamic INT8 twins."""
    model = copy.deepcopy(model).eval()
    reports = []
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        pattern = config.skip_pattern(name)
        if pattern:
            reports.append(LayerReport(name, "Linear", "float", f"skipped by pattern {pattern!r}"))
            continue
        qmod.replace_module(model, name, DynamicQuantLinear.from_float(m, qmod.WeightSpec(config.weight_format, config.per_channel)))
        reports.append(LayerReport(name, "Linear", "quantized", "int8 weights, dynamic uint8 activations"))
    model.quant_config = config
    model.quant_report = model.report = QuantReport(config.to_dict(), reports, 0, 0, 0.0, "dynamic")
    return model


def quantize_dynamic_matmuls(model: onnx.ModelProto, spec_for, stored: dict | None = None) -> list[str]:
    """Rewrite MatMul/Gemm nodes with a constant 2-D weight as dynamic INT8 (see the module docstring).
    ``spec_for(layer name, weight name)`` -> WeightSpec or None (leave the layer); ``stored``: weight name ->
    (values, scale, zero) from PyTorch twins. Returns the layer names rewritten."""
    from smallify.quant.onnx_graph import constants, drop_unused_initializers, layer_name, weight_axes, weight_input

    from smallify.quant.onnx_weights import unique_prefix

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
    from smallify.quant.onnx import check_model, compact, preprocess, save_onnx
    from smallify.quant.onnx_graph import check_finite_weights, weight_layers
    from smallify.quant.onnx_weights import quantize_embeddings

    if out is not None:
        onnx_io.check_writable(out)
    start = time.perf_counter()
    model = onnx_io.load(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else copy.deepcopy(model_or_path)
    model = preprocess(model)
    check_finite_weights(model, lambda n, w: config.skip_pattern(n, w) is None)
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
