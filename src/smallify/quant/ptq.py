"""Static INT8 post-training quantization of PyTorch modules.

Steps: trace with torch.fx and fold BatchNorm into the convolutions before it; swap Conv2d/Linear for their
quantized twins (registry); place ``ActQuant`` modules by the shared placement rule; run the calibration
data through; freeze scales and zero points. The result is an ``fx.GraphModule`` that computes what the
exported INT8 ONNX model computes.
"""
from __future__ import annotations

import operator
import time

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from smallify import data as data_mod
from smallify.errors import ModelError
from smallify.quant import modules as qmod
from smallify.quant import observers
from smallify.quant.config import Int8Static
from smallify.quant.placement import GNode, choose_scheme, place
from smallify.quant.report import LayerReport, QuantReport
from smallify.progress import track

_MODULE_KINDS = {nn.LayerNorm: "layernorm", nn.Softmax: "softmax", nn.ReLU: "relu", nn.MaxPool2d: "maxpool", nn.AdaptiveAvgPool2d: "avgpool", nn.AvgPool2d: "avgpool",
                 nn.Flatten: "flatten", nn.Identity: "identity", nn.Dropout: "identity"}
_FUNCTION_KINDS = {operator.add: "add", torch.add: "add", torch.flatten: "flatten", torch.relu: "relu",
                   F.relu: "relu", F.max_pool2d: "maxpool", F.adaptive_avg_pool2d: "avgpool",
                   F.avg_pool2d: "avgpool", torch.reshape: "reshape", F.layer_norm: "layernorm",
                   F.softmax: "softmax", torch.softmax: "softmax", torch.matmul: "act_matmul", torch.bmm: "act_matmul"}
_METHOD_KINDS = {"softmax": "softmax", "matmul": "act_matmul", "relu": "relu", "flatten": "flatten", "view": "reshape", "reshape": "reshape", "add": "add"}


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` and fold each BatchNorm into the convolution before it."""
    model = model.eval()
    try:
        return fuse(model)
    except Exception as e:  # fx raises many types; report the op that stopped it
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}. Models with data-dependent control flow "
                         "must be made traceable (or quantize their ONNX export instead)") from None


def _is_tensor_node(n: fx.Node) -> bool:
    return n.op in ("placeholder", "call_module", "call_function", "call_method")


def _kind(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        for klass in type(m).__mro__:
            if klass in _MODULE_KINDS:
                return _MODULE_KINDS[klass]
        hit = qmod.lookup(m)
        return hit[0] if hit else "other"
    if n.op == "call_function":
        if n.target in (operator.add, torch.add) and not all(isinstance(a, fx.Node) for a in n.args[:2]):
            return "other"  # adding a constant
        return _FUNCTION_KINDS.get(n.target, "other")
    if n.op == "call_method":
        return _METHOD_KINDS.get(n.target, "other")
    return "other"


def _layer_reports(gm: fx.GraphModule, config: Int8Static) -> tuple[list[LayerReport], set[str]]:
    """One report per module that holds parameters; returns them and the names to quantize."""
    reports, chosen = [], set()
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, m in gm.named_modules():
        if name == "" or name not in called or not any(True for _ in m.parameters(recurse=False)):
            continue
        op = type(m).__name__
        pattern = config.skip_pattern(name)
        if pattern is not None:
            reports.append(LayerReport(name, op, "float", f"skipped by pattern {pattern!r}"))
        elif qmod.lookup(m) is None:
            accepted = ", ".join(k.__name__ for k in qmod.REGISTRY)
            reports.append(LayerReport(name, op, "float", f"{op} has no INT8 implementation (handled: {accepted})"))
        else:
            reports.append(LayerReport(name, op, "quantized"))
            chosen.add(name)
    return reports, chosen


def quantize_module(model: nn.Module, config: Int8Static, data, progress: bool = True) -> fx.GraphModule:
    """Quantize a PyTorch module; the returned GraphModule carries ``quant_report`` and ``quant_config``."""
    gm = trace(model)
    reports, chosen = _layer_reports(gm, config)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    gnodes, outputs = [], set()
    for n in gm.graph.nodes:
        if n.op == "output":
            outputs |= {a.name for a in n.all_input_nodes}
        elif n.op != "placeholder" and n.op != "get_attr":
            kind = _kind(gm, n)
            quantize = not (n.op == "call_module" and kind in ("conv", "linear") and n.target not in chosen)
            gnodes.append(GNode(n.name, kind, [a.name for a in n.all_input_nodes if _is_tensor_node(a)],
                                [n.name], quantize))
    scheme = choose_scheme(gnodes, config.scheme)
    placement = place(gnodes, outputs, scheme)
    fmt = config.activation_format
    for name in chosen:
        m = gm.get_submodule(name)
        qmod.replace_module(gm, name, qmod.lookup(m)[1].from_float(m, config.weight_spec(name)))
    gm.add_module("act_quant", nn.ModuleDict())
    by_name = {n.name: n for n in gm.graph.nodes}
    for t in placement.tensors():
        obs = None if t in placement.shared else observers.make_observer(config.calibration, config.percentile, t, fmt)
        gm.act_quant[t] = qmod.ActQuant(fmt, obs, t)
        node = by_name[t]
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(f"act_quant.{t}", (node,))
        readers = placement.only_for.get(t)
        node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q and (readers is None or u.name in readers))
    gm.graph.lint()
    gm.recompile()

    start, samples = time.perf_counter(), 0
    if data is None:    # structure only: parameters come from a saved file (smallify.load)
        for q in gm.act_quant.values():
            q.calibrating, q.observer = False, None
    else:
        with torch.no_grad():
            stream = data_mod.batches(data, names, limit=config.max_calibration_samples)
            for batch in track(stream, "calibrating", progress):
                gm(*[batch[n] for n in names])
                samples += next(iter(batch.values())).shape[0]
        for t in placement.calibrated:
            gm.act_quant[t].freeze()
    for t, src in placement.shared.items():
        gm.act_quant[t].set_qparams(gm.act_quant[src].scale, gm.act_quant[src].zero_point)
    gm.quant_config = config
    gm.quant_report = QuantReport(config.to_dict(), reports, len(placement.tensors()), samples,
                                  time.perf_counter() - start, scheme)
    return gm.eval()
