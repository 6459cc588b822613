"""The ONNX graph path: calibrate with ONNX Runtime and write a QDQ model.

The same placement rule, observers and scale arithmetic as the PyTorch path. Graph reading lives in
``graph.py``, weight writing in ``weights.py``; the writer (``quantize_weights`` and
``fold_relu_into_quantize``) is also the last step of ``export_onnx`` for
PyTorch-quantized models, so both paths produce the same graph shape:

    x:uint8 -DQ-> Conv(W: int8 per-channel -DQ, bias: int32 -DQ) -> Q:uint8 ...

which ONNX Runtime fuses into QLinearConv / QGemm / QLinearAdd on x86 (VNNI/AMX u8s8 kernels)."""
from __future__ import annotations

import os
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from smallify import data as data_mod
from smallify.errors import ModelError
from smallify.onnx import io as onnx_io
from smallify.onnx.calibrate import calibrate, check_calibration_inputs
from smallify.onnx.graph import (
    WEIGHT_OPS,
    constants,
    drop_unused_initializers,
    input_names,
    layer_name,
    weight_input,
)
from smallify.onnx.io import check_model, save_onnx
from smallify.onnx.prepare import preprocess, reduce_mean_to_global_average_pool
from smallify.onnx.weights import onnx_type, quantize_embeddings, quantize_weights
from smallify.quant import modules as qmod
from smallify.quant import observers
from smallify.quant.config import Int8Static
from smallify.quant.placement import GNode, choose_scheme, place
from smallify.quant.report import LayerReport, QuantReport

_KINDS = {"LayerNormalization": "layernorm", "Softmax": "softmax", "Relu": "relu", "Add": "add", "Mul": "mul",
          "MaxPool": "maxpool", "GlobalAveragePool": "avgpool", "AveragePool": "avgpool", "Flatten": "flatten", "Reshape": "reshape", "Transpose": "transpose",
          "Squeeze": "squeeze", "Unsqueeze": "unsqueeze", "Identity": "identity", "ReduceMean": "avgpool"}


_FLOAT_LAYERS = {"ConvTranspose", "LSTM", "GRU", "RNN", "ConvInteger", "MatMulInteger", "Einsum"}


def needed_opset(config) -> int:
    """The default-domain opset a config's output graph needs: 13 (per-channel Q/DQ), 19 (FP8 types) or 21
    (int4 and blocked DequantizeLinear)."""
    from smallify.quant.config import FP8Static

    if isinstance(config, FP8Static):
        return 19
    bits = [getattr(config, "weight_bits", 8), getattr(config, "bits", 8)]
    bits += [b for b in getattr(config, "candidates", ())]
    bits += [b for b in getattr(config, "layer_bits", {}).values() if isinstance(b, int)]
    return 21 if min(bits) <= 4 or getattr(config, "group_size", None) else 13


def graph_view(model: onnx.ModelProto, config: Int8Static) -> tuple[list[GNode], set[str], list[LayerReport]]:
    """The graph as the placement rule sees it, and a report line per weight layer."""
    consts = constants(model)
    g = model.graph
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    gnodes, reports = [], []
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        acts = [t for t in node.input if t and t not in consts]
        kind, quantize_it = _KINDS.get(node.op_type, "other"), True
        if node.op_type in WEIGHT_OPS:
            w = weight_input(node, consts)
            name = layer_name(node, consts)
            if w is None and node.op_type != "MatMul":
                reports.append(LayerReport(name, node.op_type, "float", "weight is not a constant initializer"))
                kind = "other"
            elif w is None:
                kind = "act_matmul"  # activation x activation (attention)
            else:
                kind = WEIGHT_OPS[node.op_type]
                wname = node.input[w]
                pattern = config.skip_pattern(name, node.name, wname)
                if pattern is not None:
                    reports.append(LayerReport(name, node.op_type, "float", f"skipped by pattern {pattern!r}"))
                    quantize_it = False
                elif not np.isfinite(consts[wname]).all():
                    raise ModelError(f"weight {wname!r} of layer {name!r} holds NaN or Inf")
                else:
                    reports.append(LayerReport(name, node.op_type, "quantized"))
        elif node.op_type in _FLOAT_LAYERS:
            reports.append(LayerReport(layer_name(node), node.op_type, "float",
                                       f"{node.op_type} has no INT8 implementation (handled: Conv, Gemm, MatMul)"))
        if kind in ("add", "mul") and (len(acts) != 2 or any(elem.get(t) != TensorProto.FLOAT for t in acts)):
            kind = "other"      # an integer Add/Mul has two float activations (not shape arithmetic on int64)
        gnodes.append(GNode(layer_name(node, consts), kind, acts, list(node.output), quantize_it))
    return gnodes, {o.name for o in model.graph.output}, reports


def insert_qdq(model: onnx.ModelProto, qparams: dict[str, tuple[float, int]], fmt,
               only_for: dict[str, set[str]] | None = None) -> None:
    """Insert QuantizeLinear -> DequantizeLinear after each tensor in ``qparams`` and rewire its consumers
    (only those named in ``only_for[tensor]``, by layer name, when given)."""
    g = model.graph
    consts = constants(model)
    only_for = only_for or {}
    zdtype = onnx_type(fmt)
    inserted: dict[str, list[onnx.NodeProto]] = {}
    rename: dict[str, str] = {}
    for t, (scale, zero) in qparams.items():
        s_name, z_name, q_name, dq_name = f"{t}:s", f"{t}:zp", f"{t}:q", f"{t}:dq"
        g.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name))
        g.initializer.append(helper.make_tensor(z_name, zdtype, [], [int(zero) if zdtype in (TensorProto.INT8, TensorProto.UINT8) else 0.0]))
        inserted[t] = [helper.make_node("QuantizeLinear", [t, s_name, z_name], [q_name]),
                       helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_name])]
        rename[t] = dq_name
    nodes = []
    for t in input_names(model):
        nodes += inserted.get(t, [])
    for node in g.node:
        for i, t in enumerate(node.input):
            if t in rename and (t not in only_for or layer_name(node, consts) in only_for[t]):
                node.input[i] = rename[t]
        nodes.append(node)
        for o in node.output:
            nodes += inserted.get(o, [])
    del g.node[:]
    g.node.extend(nodes)


def fold_relu_into_quantize(model: onnx.ModelProto) -> int:
    """Remove each Relu whose only consumers are QuantizeLinear nodes with zero point at the bottom of the range
    (0 for uint8, -128 for int8): the quantizer's clamp already does what the Relu does. Returns the count."""
    g = model.graph
    consts = constants(model)
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    keep, removed = [], 0
    for n in g.node:
        if n.op_type == "Relu" and n.output[0] not in outputs:
            qs = users.get(n.output[0], [])
            if qs and all(q.op_type == "QuantizeLinear" and len(q.input) > 2 and q.input[2] in consts
                          and consts[q.input[2]].dtype.kind in "iu"
                          and int(consts[q.input[2]]) == np.iinfo(consts[q.input[2]].dtype).min for q in qs):
                for q in qs:
                    q.input[0] = n.input[0]
                removed += 1
                continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return removed


_DEFAULT_ATTRS = {"auto_pad": b"NOTSET", "group": 1, "saturate": 1}


def compact(model: onnx.ModelProto) -> None:
    """Drop what costs bytes and carries nothing: node names and doc strings, attributes at their default value,
    the axis of per-tensor Q/DQ, intermediate shapes, all-zero zero points of Conv weights (the default), and
    long names of intermediate tensors. On a 175k-parameter model this takes the file from 0.30x to under
    0.27x the float file; weights keep their PyTorch names."""
    g = model.graph
    consts = constants(model)
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        n.ClearField("name")
        n.ClearField("doc_string")
        keep = []
        for a in n.attribute:
            v = helper.get_attribute_value(a)
            if _DEFAULT_ATTRS.get(a.name, object()) == v:
                continue
            if a.name in ("dilations", "strides") and all(x == 1 for x in v):
                continue
            if a.name == "pads" and all(x == 0 for x in v):
                continue
            if a.name == "axis" and n.op_type in ("QuantizeLinear", "DequantizeLinear") \
                    and n.input[1] in consts and consts[n.input[1]].ndim == 0:
                continue
            keep.append(a)
        del n.attribute[:]
        n.attribute.extend(keep)
    for n in g.node:
        if n.op_type == "Conv" and len(n.input) > 1:
            dq = producer.get(n.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) == 3 \
                    and dq.input[2] in consts and not consts[dq.input[2]].any():
                del dq.input[2]
    # intermediate tensors get short names ("t12"); weights, inputs and outputs keep theirs
    keep_names = {i.name for i in g.input} | {o.name for o in g.output} | {i.name for i in g.initializer}
    rename: dict[str, str] = {}
    for n in g.node:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
        for i, t in enumerate(n.output):
            if t and t not in keep_names:
                rename[t] = n.output[i] = f"t{len(rename)}"
    del g.value_info[:]
    del g.metadata_props[:]   # the exporter's graph-level debugging records
    drop_unused_initializers(model)


def round_trips(model: onnx.ModelProto) -> dict[str, int]:
    """Operators that still read a DequantizeLinear output and feed a QuantizeLinear once ONNX Runtime has fused
    what it can into integer kernels (its optimized graph, extended level): they have no integer kernel, so their
    tensor is dequantized, computed in float and quantized again (e.g. HardSigmoid in hard-swish). Returns op
    type -> count; {} when ONNX Runtime cannot build the graph here (FP8)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        try:
            onnx_io.ort_session(model, so)
            graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        except Exception:  # noqa: BLE001 - a diagnostic only; the model itself was checked
            return {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    dq_out = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    counts: dict[str, int] = {}
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or not any(t in dq_out for t in n.input):
            continue
        if any(c.op_type == "QuantizeLinear" for o in n.output for c in consumers.get(o, [])):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def quantize_onnx(model_or_path, config: Int8Static, data, out: str | os.PathLike | None = None,
                  progress: bool = True, cache: dict | None = None) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize a float ONNX model to a QDQ model; writes ``out`` atomically when given. ``cache``: a dict
    kept between calls that differ only in weight grids (mixed-precision search): calibration runs once."""
    if out is not None:
        onnx_io.check_writable(out)
    model = onnx_io.load(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    model = preprocess(model, needed_opset(config))
    reduce_mean_to_global_average_pool(model)
    if isinstance(data, (str, os.PathLike)):
        data = data_mod.load_npz(data, config.max_calibration_samples)
    if isinstance(data, dict) and all(isinstance(v, np.ndarray) for v in data.values()):
        data = check_calibration_inputs(model, dict(data))
    gnodes, outputs, reports = graph_view(model, config)
    scheme = choose_scheme(gnodes, config.scheme)
    alpha = (0.8 if scheme == "transformer" else None) if config.smooth_quant == "auto" else config.smooth_quant
    if alpha is not None:
        from smallify.onnx.smooth import smooth_onnx

        if not smooth_onnx(model, data, config, alpha, progress):
            alpha = None   # nothing to smooth: no MatMul with a constant weight
        gnodes, outputs, reports = graph_view(model, config)
    placement = place(gnodes, outputs, scheme)
    start = time.perf_counter()
    fmt = config.activation_format
    if cache is not None and "qparams" in cache:
        qparams, samples = cache["qparams"], cache["samples"]
    else:
        obs, samples = calibrate(model, placement.calibrated, data, config, progress)
        qparams = {}
        for t in placement.calibrated:
            s, z = qmod.act_qparams(*observers.range_of(obs[t]), fmt)
            qparams[t] = (float(s), int(z))
        for t, src in placement.shared.items():
            qparams[t] = qparams[src]
        if cache is not None:
            cache.update(qparams=qparams, samples=samples)
    elapsed = time.perf_counter() - start
    insert_qdq(model, qparams, fmt, placement.only_for)
    fold_relu_into_quantize(model)
    chosen = {r.name for r in reports if r.status == "quantized"}
    quantize_weights(model, lambda name, wname, ch: config.weight_spec(name, wname, in_channels=ch) if name in chosen else None)
    for table in quantize_embeddings(model):
        reports.append(LayerReport(table, "Gather", "quantized", "embedding table: weight-only int8 per row"))
    model.producer_name = "smallify"
    compact(model)
    check_model(model)
    report = QuantReport(config.to_dict(), reports, len(qparams), samples, elapsed, scheme, alpha,
                         round_trips=round_trips(model))
    if out is not None:
        save_onnx(model, out)
    return model, report
