"""Static INT8 post-training quantization of PyTorch modules.

Steps: trace with torch.fx and fold BatchNorm into the convolutions before it; swap Conv2d/Linear for their
quantized twins (registry); place ``ActQuant`` modules by the shared placement rule; run the calibration
data through; freeze scales and zero points. The result is an ``fx.GraphModule`` that computes what the
exported INT8 ONNX model computes.
"""
from __future__ import annotations

import inspect
import operator
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from smallify import data as data_mod
from smallify.errors import DataError, ModelError, SmallifyError, first_line
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
        twin = qmod.lookup(m)
        return twin.kind if twin else "other"
    if n.op == "call_function":
        if n.target in (operator.add, torch.add) and not all(isinstance(a, fx.Node) for a in n.args[:2]):
            return "other"  # adding a constant
        return _FUNCTION_KINDS.get(n.target, "other")
    if n.op == "call_method":
        return _METHOD_KINDS.get(n.target, "other")
    return "other"


_FUNCTIONAL = ("read by a functional call (F.linear, F.conv2d, ...), which has no twin; make it an nn.Linear / "
               "nn.Conv2d module to quantize it")


def _functional_reports(gm: fx.GraphModule, model: nn.Module, reported: set[str]) -> list[LayerReport]:
    """The parameters torch.fx traced into functional calls (``get_attr`` nodes): custom modules that hold a
    weight, and ``F.linear(x, self.weight)`` in a forward. They stay float and are listed by their owner."""
    params = dict(gm.named_parameters())
    owners: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in params:
            owner = n.target.rpartition(".")[0] or n.target
            if owner not in reported:
                uses = owners.setdefault(owner, [])
                uses += [getattr(u.target, "__name__", str(u.target)) for u in n.users if u.op != "output"]
    reports, modules = [], dict(model.named_modules())     # the traced copy's containers are plain nn.Module
    for owner, uses in owners.items():
        op = type(modules[owner]).__name__ if owner in modules else "Parameter"
        calls = ", ".join(sorted(set(uses))) or "no call"
        reports.append(LayerReport(owner, op, "float", f"its parameters are read by functional {calls}, which has no "
                                   "twin; make it an nn.Linear / nn.Conv2d module to quantize it"))
    return reports


def _layer_reports(modules, config: Int8Static) -> tuple[list[LayerReport], set[str]]:
    """One report per module of ``modules`` ((name, module) pairs) that holds parameters; returns them and
    the names to quantize."""
    reports, chosen = [], set()
    for name, m in modules:
        if name == "":      # the model's own parameters: read by functional calls in its forward
            reports += [LayerReport(p, "Parameter", "float", _FUNCTIONAL) for p, _ in m.named_parameters(recurse=False)]
            continue
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        op = type(m).__name__
        pattern = config.skip_pattern(name)
        if pattern is not None:
            reports.append(LayerReport(name, op, "float", f"skipped by pattern {pattern!r}"))
        elif qmod.lookup(m) is None:
            accepted = ", ".join(qmod.handled_names())
            reports.append(LayerReport(name, op, "float", f"{op} has no INT8 implementation (handled: {accepted})"))
        else:
            reports.append(LayerReport(name, op, "quantized"))
            chosen.add(name)
    return reports, chosen


def quantize_module(model: nn.Module, config: Int8Static, data, progress: bool = True) -> fx.GraphModule:
    """Quantize a PyTorch module; the returned GraphModule carries ``quant_report`` and ``quant_config``."""
    try:
        gm = trace(model)
    except ModelError:
        if not untraced_ok(model, config):
            raise
        return quantize_untraced(model, config, data, progress)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    reports, chosen = _layer_reports(((n, m) for n, m in gm.named_modules() if n in called), config)
    reports += _functional_reports(gm, model, {r.name for r in reports})
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
    for name in [n for n, _ in gm.named_modules() if n in chosen]:      # model order: the first bad layer is named
        m, twin = gm.get_submodule(name), qmod.lookup(gm.get_submodule(name))
        qmod.replace_module(gm, name, twin.from_float(m, config.weight_spec(name, in_channels=twin.float_weight(m).shape[1])))
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

    start = time.perf_counter()
    samples = _calibrate(lambda batch: gm(*[batch[n] for n in names]), names, data, config, progress)
    if data is None:    # structure only: parameters come from a saved file (smallify.load)
        for q in gm.act_quant.values():
            q.calibrating, q.observer = False, None
    else:
        for t in placement.calibrated:
            gm.act_quant[t].freeze()
    for t, src in placement.shared.items():
        gm.act_quant[t].set_qparams(gm.act_quant[src].scale, gm.act_quant[src].zero_point)
    gm.quant_config, gm.input_names = config, names
    gm.quant_report = gm.report = QuantReport(config.to_dict(), reports, len(placement.tensors()), samples,
                                              time.perf_counter() - start, scheme)
    return gm.eval()


def _calibrate(run, names: list[str], data, config: Int8Static, progress: bool) -> int:
    """Run the calibration batches through ``run(batch dict)``; returns the number of samples."""
    samples = 0
    if data is not None:
        with torch.no_grad():
            stream = data_mod.batches(data, names, limit=config.max_calibration_samples)
            for i, batch in enumerate(track(stream, "calibrating", progress)):
                try:
                    run(batch)
                except SmallifyError:
                    raise
                except (RuntimeError, TypeError, ValueError, IndexError) as e:
                    given = {k: f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in batch.items()}
                    why = first_line(e)
                    raise DataError(f"the model cannot run calibration batch {i} ({given}): {why}; give batches "
                                    "that the model's forward takes (shape and dtype)") from None
                samples += next(iter(batch.values())).shape[0]
    return samples


def untraced_ok(model: nn.Module, config: Int8Static) -> bool:
    """Whether a model torch.fx cannot trace is quantized without a graph: with the transformer placement
    (chosen, or 'auto' on a model holding LayerNorm / RMSNorm / Softmax modules: Llama's norm is its own
    ``LlamaRMSNorm`` class), which needs none."""
    if config.scheme == "auto":
        return any(isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.Softmax)) or type(m).__name__.endswith("RMSNorm")
                   for m in model.modules())
    return config.scheme == "transformer"


def _input_names(model: nn.Module, data) -> list[str]:
    first = data[0] if isinstance(data, (list, tuple)) and data else data
    if isinstance(first, Mapping):
        return list(first)
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[:1] or ["input"]


def quantize_untraced(model: nn.Module, config: Int8Static, data, progress: bool = True) -> nn.Module:
    """Quantize a model torch.fx cannot trace (Hugging Face transformers) with the transformer placement,
    which needs no graph: every layer with a twin is swapped, and the twin quantizes its own input
    (``input_quant``). Returns a copy of ``model`` with ``quant_report`` and ``quant_config``."""
    from smallify.quant.weight_only import fold_batchnorm

    model = fold_batchnorm(model)
    reports, chosen = _layer_reports(model.named_modules(), config)
    fmt = config.activation_format
    quantizers, originals = {}, {}
    for name in sorted(chosen):
        m = model.get_submodule(name)
        klass = qmod.lookup(m)
        twin = klass.from_float(m, config.weight_spec(name, in_channels=klass.float_weight(m).shape[1]))
        obs = None if data is None else observers.make_observer(config.calibration, config.percentile, name, fmt)
        twin.input_quant = qmod.ActQuant(fmt, obs, name)
        quantizers[name], originals[name] = twin.input_quant, m
        qmod.replace_module(model, name, twin)
    names = _input_names(model, data)
    start = time.perf_counter()
    samples = _calibrate(lambda batch: model(**batch), names, data, config, progress)
    if data is not None:
        by_name = {r.name: r for r in reports}
        for name, q in list(quantizers.items()):
            try:
                q.freeze()
            except DataError:       # the layer never ran on the calibration data: no input range to quantize
                qmod.replace_module(model, name, originals[name])
                del quantizers[name]
                by_name[name].status, by_name[name].reason = "float", "not called on the calibration data"
    model.quant_config, model.input_names = config, names
    model.quant_report = model.report = QuantReport(config.to_dict(), reports, len(quantizers), samples,
                                                    time.perf_counter() - start, "transformer")
    return model.eval()
