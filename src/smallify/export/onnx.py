"""PyTorch -> ONNX. Quantized models come out as QDQ graphs that ONNX Runtime runs with integer kernels."""
from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from smallify.errors import ConfigError
from smallify.onnx import io as onnx_io
from smallify.export import ops
from smallify.quant import modules as qmod
from smallify.quant.dynamic import DynamicQuantLinear
from smallify.onnx.dynamic import quantize_dynamic_matmuls
from smallify.quant.primitives import FloatFormat
from smallify.quant.weight_only import HalfPrecision
from smallify.onnx.weight_only import store_half
from smallify.onnx.quantize import compact, fold_relu_into_quantize
from smallify.onnx.prepare import reduce_mean_to_global_average_pool
from smallify.onnx.weights import quantize_weights


class _ExportActQuant(nn.Module):
    """ActQuant with its parameters as Python numbers: exported as QuantizeLinear/DequantizeLinear constants."""

    def __init__(self, q: qmod.ActQuant):
        super().__init__()
        self.scale, self.zero_point = float(q.scale), int(q.zero_point)
        self.fp8 = q.fmt.name if isinstance(q.fmt, FloatFormat) else None
        self.qmin, self.qmax = (0, 0) if self.fp8 else (q.fmt.qmin, q.fmt.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return ops.fp8_quantize_dequantize(x, self.scale, self.fp8)
        return ops.quantize_dequantize(x, self.scale, self.zero_point, self.qmin, self.qmax)


def _weight_initializers(proto: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Initializer name -> module name for ``weights`` (module name -> dequantized weight), found by value:
    the exporter may fold a transpose into the weight (Linear on 3-D inputs becomes MatMul(x, W^T)) and rename it."""
    from onnx import numpy_helper

    def key(a: np.ndarray) -> tuple:
        return a.shape, hash(np.ascontiguousarray(a).tobytes())

    by_value: dict[tuple, str] = {}
    for init in proto.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2:
            by_value.setdefault(key(numpy_helper.to_array(init)), init.name)
    found = {}
    for module, w in weights.items():
        w = w.detach().float().numpy()
        candidates = [w] + ([w.T] if w.ndim == 2 else [])
        name = next((by_value[key(c)] for c in candidates if key(c) in by_value), None)
        if name is None:
            raise RuntimeError(f"internal: the weight of quantized layer {module!r} is not in the exported ONNX graph")
        found[name] = module
    return found


def _float_twins(gm: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, nn.Module]]:
    """A copy whose quantized twins are plain float layers holding the dequantized weights (exact grid values)."""
    gm = copy.deepcopy(gm)
    for p in gm.parameters():
        p.requires_grad_(False)  # the exporter has no decomposition for the training form of fake_quantize
    weights, twins = {}, {}
    for name, m in list(gm.named_modules()):
        if isinstance(m, HalfPrecision):   # float32 compute on the half-precision values; stored half (store_half)
            plain = copy.deepcopy(m.layer).float()
            qmod.replace_module(gm, name, plain)
            weights[name], twins[name] = plain.weight, m
        if isinstance(m, qmod.ActQuant) and not name.endswith(".input_quant"):   # those go with their twin
            qmod.replace_module(gm, name, _ExportActQuant(m))
        if isinstance(m, qmod.QuantTwin):
            if m.spec.fmt is not None:
                twins[name] = m
            plain = m.to_float()
            q = m._modules.get("input_quant")
            qmod.replace_module(gm, name, plain if q is None else nn.Sequential(_ExportActQuant(q), plain))
            if m.spec.fmt is not None:
                weights[name] = plain.weight
    return gm, weights, twins


def _as_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def to_onnx_proto(model: nn.Module, example_inputs, dynamic_batch: bool = True, opset: int = 20,
                  input_names: list[str] | None = None) -> onnx.ModelProto:
    """torch.onnx (dynamo) export to an in-memory ModelProto, batch axis dynamic."""
    inputs = tuple(x.expand(2, *x.shape[1:]).contiguous() if dynamic_batch and x.shape[0] == 1 else x
                   for x in _as_tuple(example_inputs))
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic = tuple({0: batch} for _ in inputs)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model.eval(), inputs, path, dynamo=True, opset_version=opset,
                          dynamic_shapes=dynamic,
                          input_names=input_names or ["input" if len(inputs) == 1 else f"input_{i}"
                                                      for i in range(len(inputs))],
                          output_names=["output"], external_data=False, verbose=False,
                          custom_translation_table=ops.TRANSLATIONS)
        proto = onnx.load(path)
    for node in proto.graph.node:   # the exporter's per-node stack traces: debugging data, often most of the file
        del node.metadata_props[:]
        node.ClearField("doc_string")
    _name_folded_weights(proto, model)
    return proto


def _name_folded_weights(proto: onnx.ModelProto, model: nn.Module) -> None:
    """Give weights that the exporter transposed into a new constant ('val_12') their parameter's name again,
    so that layers read 'encoder.layer.0.attention.self.query' in reports and skip patterns, not 'node_MatMul_7'."""
    from onnx import numpy_helper

    def key(a: np.ndarray) -> tuple:
        return a.shape, hash(np.ascontiguousarray(a).tobytes())

    params, names = {}, {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        if p.ndim == 2:
            params.setdefault(key(p.detach().float().numpy().T), name)
    taken = {i.name for i in proto.graph.initializer}
    rename = {}
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or init.name in names:
            continue
        name = params.get(key(numpy_helper.to_array(init)))
        if name is not None and name not in taken:
            rename[init.name] = init.name = name
            taken.add(name)
    for node in proto.graph.node:
        for i, t in enumerate(node.input):
            if t in rename:
                node.input[i] = rename[t]


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs, dynamic_batch: bool = True,
                input_names: list[str] | None = None, shared: str = "expand") -> Path:
    """Write ``model`` as ONNX (inputs named ``input_names``; default 'input', or 'input_0', 'input_1', ...).
    A model from ``smallify.quantize`` is written as a QDQ model: uint8 activations,
    int8 per-channel weights, int32 biases; ONNX Runtime fuses it into integer kernels.

    A model from ``smallify.cluster``: ``shared='expand'`` writes float weights; ``shared='indices'`` keeps each
    shared weight as its codebook + bit-packed index table expanded in the graph (a smaller file; ONNX Runtime
    folds the expansion at session start, so it runs as fast as the expanded form)."""
    onnx_io.check_writable(path)
    if shared not in ("expand", "indices"):
        raise ConfigError(f"shared={shared!r} is not supported; accepted: 'expand', 'indices'")
    from smallify.cluster.modules import SharedTwin, expand

    shared_layers = {n: m for n, m in model.named_modules() if isinstance(m, SharedTwin)}
    if shared_layers:
        plain = expand(copy.deepcopy(model))
        proto = to_onnx_proto(plain, example_inputs, dynamic_batch, input_names=input_names)
        if shared == "indices":
            from smallify.export.shared import keep_indices

            weights = {n: m.weight.detach() for n, m in shared_layers.items() if m.weight.ndim >= 2}
            keep_indices(proto, shared_layers, _weight_initializers(proto, weights))
            proto.producer_name = "smallify"
        onnx.checker.check_model(proto)
        return onnx_io.save(proto, path)
    quantized = any(isinstance(m, (qmod.QuantTwin, qmod.ActQuant, HalfPrecision))
                    for m in model.modules())
    plain, weights, twins = _float_twins(model) if quantized else (model, {}, {})
    proto = to_onnx_proto(plain, example_inputs, dynamic_batch, input_names=input_names)
    if quantized:
        weight_names = _weight_initializers(proto, weights)
        reduce_mean_to_global_average_pool(proto)
        fold_relu_into_quantize(proto)
        halves = {w: twins[module].dtype for w, module in weight_names.items() if isinstance(twins[module], HalfPrecision)}
        weight_names = {w: module for w, module in weight_names.items() if w not in halves}
        if halves:
            store_half(proto, next(iter(halves.values())), lambda name, wname: wname in halves)
        specs = {w: twins[module].spec for w, module in weight_names.items()}
        stored = {w: twins[module].stored() for w, module in weight_names.items()}
        dynamic = {w for w, module in weight_names.items() if isinstance(twins[module], DynamicQuantLinear)}
        done = quantize_dynamic_matmuls(proto, lambda name, wname: specs[wname] if wname in dynamic else None, stored)
        static = any(isinstance(m, qmod.ActQuant) for m in model.modules())
        done += quantize_weights(proto, lambda name, wname, _: None if wname in dynamic else specs.get(wname), stored,
                                 static)
        if len(done) != len(weight_names):
            raise RuntimeError(f"internal: {len(weight_names)} quantized layers but {len(done)} found in the ONNX graph")
        proto.producer_name = "smallify"
        compact(proto)
    onnx.checker.check_model(proto)
    return onnx_io.save(proto, path)
