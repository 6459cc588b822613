"""The ONNX graph path: calibrate with ONNX Runtime and write a QDQ model.

The same placement rule, observers and scale arithmetic as the PyTorch path. The writer
(``quantize_weights`` and ``fold_relu_into_quantize``) is also the last step of ``export_onnx`` for
PyTorch-quantized models, so both paths produce the same graph shape:

    x:uint8 -DQ-> Conv(W: int8 per-channel -DQ, bias: int32 -DQ) -> Q:uint8 ...

which ONNX Runtime fuses into QLinearConv / QGemm / QLinearAdd on x86 (VNNI/AMX u8s8 kernels).
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from smallify import data as data_mod
from smallify import onnx_io
from smallify.errors import DataError, ModelError
from smallify.progress import track
from smallify.quant import modules as qmod
from smallify.quant import observers
from smallify.quant.config import Int8Static
from smallify.quant.placement import GNode, choose_scheme, place
from smallify.quant.primitives import INT8_WEIGHT, FloatFormat, IntFormat, quantize, weight_qparams
from smallify.quant.report import LayerReport, QuantReport

_KINDS = {"LayerNormalization": "layernorm", "Softmax": "softmax", "Relu": "relu", "Add": "add",
          "MaxPool": "maxpool", "GlobalAveragePool": "avgpool", "AveragePool": "avgpool", "Flatten": "flatten", "Reshape": "reshape", "Transpose": "transpose",
          "Squeeze": "squeeze", "Unsqueeze": "unsqueeze", "Identity": "identity", "ReduceMean": "avgpool"}
_WEIGHT_OPS = {"Conv": "conv", "Gemm": "linear", "MatMul": "matmul"}
_FLOAT_LAYERS = {"ConvTranspose", "LSTM", "GRU", "RNN", "ConvInteger", "MatMulInteger", "Einsum"}


def preprocess(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's basic graph optimizations (BatchNorm folding, constant folding), then shape inference."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "opt.onnx")
        onnx.save(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        try:
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:300]}") from None
        out = onnx.load(dst)
    return onnx.shape_inference.infer_shapes(out)


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts


def weight_input(node: onnx.NodeProto, consts: dict) -> int | None:
    """Index of the constant weight input of a Conv/Gemm/MatMul, or None."""
    if node.op_type in ("Conv", "Gemm"):
        return 1 if len(node.input) > 1 and node.input[1] in consts else None
    if node.op_type == "MatMul":
        return 1 if node.input[1] in consts and consts[node.input[1]].ndim == 2 else None
    return None


def layer_name(node: onnx.NodeProto, consts: dict | None = None) -> str:
    """A layer's name for people: its weight's name without '.weight' (the PyTorch module path for exported
    models), else the node's name."""
    if consts is not None and node.op_type in _WEIGHT_OPS:
        w = weight_input(node, consts)
        if w is not None and node.input[w].endswith(".weight"):
            return node.input[w][: -len(".weight")]
    return node.name or node.output[0]


def weight_layers(model: onnx.ModelProto):
    """(node, weight input index, layer name, input channels) of every Conv/Gemm/MatMul with a constant weight."""
    consts = constants(model)
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        w_idx = weight_input(node, consts)
        if w_idx is not None and node.input[w_idx] in inits:
            w = consts[node.input[w_idx]]
            yield node, w_idx, layer_name(node, consts), (w.shape[0] if weight_axes(node)[1] else w.shape[1])


def graph_view(model: onnx.ModelProto, config: Int8Static) -> tuple[list[GNode], set[str], list[LayerReport]]:
    """The graph as the placement rule sees it, and a report line per weight layer."""
    consts = constants(model)
    gnodes, reports = [], []
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        acts = [t for t in node.input if t and t not in consts]
        kind, quantize_it = _KINDS.get(node.op_type, "other"), True
        if node.op_type in _WEIGHT_OPS:
            w = weight_input(node, consts)
            name = layer_name(node, consts)
            if w is None and node.op_type != "MatMul":
                reports.append(LayerReport(name, node.op_type, "float", "weight is not a constant initializer"))
                kind = "other"
            elif w is None:
                kind = "act_matmul"  # activation x activation (attention)
            else:
                kind = _WEIGHT_OPS[node.op_type]
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
        if kind == "add" and len(acts) != 2:
            kind = "other"
        gnodes.append(GNode(layer_name(node, consts), kind, acts, list(node.output), quantize_it))
    return gnodes, {o.name for o in model.graph.output}, reports


def input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def check_calibration_inputs(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Match a .npz's arrays to the model's inputs by name (a single array may have any key) and shape."""
    names = input_names(model)
    if len(arrays) == 1 and len(names) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing or extra:
        raise DataError(f"calibration arrays {sorted(arrays)} do not match the model inputs {names}"
                        + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    by_name = {i.name: i for i in model.graph.input}
    for name in names:
        dims = by_name[name].type.tensor_type.shape.dim
        want = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        got = arrays[name].shape
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want[1:], got[1:])):
            shown = ["N" if w is None else w for w in want]
            raise DataError(f"calibration array {name!r} has shape {tuple(got)}; the model input expects "
                            f"{tuple(shown)} (first axis = samples)")
        elem = by_name[name].type.tensor_type.elem_type
        if elem == TensorProto.FLOAT:
            if not np.issubdtype(arrays[name].dtype, np.floating):
                raise DataError(f"calibration array {name!r} has dtype {arrays[name].dtype}; the model input is float32")
            arrays[name] = arrays[name].astype(np.float32, copy=False)
            if not np.isfinite(arrays[name]).all():
                raise DataError(f"calibration array {name!r} holds NaN or Inf")
    return arrays


def _batch_size(model: onnx.ModelProto) -> int:
    first = model.graph.input[0].type.tensor_type.shape.dim
    return first[0].dim_value if first and first[0].HasField("dim_value") else 32


def calibrate(model: onnx.ModelProto, tensors: list[str], data, config: Int8Static, progress: bool = True,
              make_observer=None, what: str = "calibrating") -> tuple[dict, int]:
    """Run ONNX Runtime on ``data`` and observe every tensor in ``tensors``; returns observers and sample count.
    ``make_observer(tensor)`` overrides the config's activation observer."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fmt = config.activation_format
    make_observer = make_observer or (lambda t: observers.make_observer(config.calibration, config.percentile, t, fmt))
    obs = {t: make_observer(t) for t in tensors}
    names, samples = input_names(model), 0
    dtypes = {i.name: i.type for i in session.get_inputs()}
    for batch in track(data_mod.batches(data, names, _batch_size(model), config.max_calibration_samples),
                       what, progress):
        feed = {k: v.numpy().astype(np.float32) if "float" in dtypes[k] else v.numpy() for k, v in batch.items()}
        try:
            outs = session.run(tensors, feed)
        except Exception as e:
            raise DataError(f"ONNX Runtime rejected the calibration batch: {str(e).splitlines()[0][:300]}") from None
        for t, value in zip(tensors, outs):
            obs[t].observe(torch.from_numpy(np.asarray(value, dtype=np.float32)))
        samples += next(iter(batch.values())).shape[0]
    return obs, samples


def insert_qdq(model: onnx.ModelProto, qparams: dict[str, tuple[float, int]], fmt,
               only_for: dict[str, set[str]] | None = None) -> None:
    """Insert QuantizeLinear -> DequantizeLinear after each tensor in ``qparams`` and rewire its consumers
    (only those named in ``only_for[tensor]``, by layer name, when given)."""
    g = model.graph
    consts = constants(model)
    only_for = only_for or {}
    zdtype = _onnx_type(fmt)
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


def _rank(model: onnx.ModelProto, tensor: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def reduce_mean_to_global_average_pool(model: onnx.ModelProto) -> int:
    """Rewrite ReduceMean over the spatial axes of a 4-D tensor (keepdims) as GlobalAveragePool, which ONNX
    Runtime runs on uint8 (QLinearGlobalAveragePool, channels-last) where ReduceMean would run in float.
    PyTorch exports ``AdaptiveAvgPool2d(1)`` as that ReduceMean. Returns the count."""
    consts = constants(model)
    count = 0
    for n in model.graph.node:
        if n.op_type != "ReduceMean" or _rank(model, n.input[0]) != 4:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axes = attrs.get("axes")
        if axes is None and len(n.input) > 1 and n.input[1] in consts:
            axes = consts[n.input[1]].tolist()
        if attrs.get("keepdims", 1) != 1 or axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        n.op_type = "GlobalAveragePool"
        del n.input[1:]
        del n.attribute[:]
        count += 1
    if count:
        drop_unused_initializers(model)
    return count


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


def weight_axes(node: onnx.NodeProto) -> tuple[int, bool]:
    """(output-channel axis of the weight in ONNX layout, whether that layout is PyTorch's transposed)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, False) if trans_b else (1, True)
    if node.op_type == "MatMul":
        return 1, True
    return 0, False


def _onnx_type(fmt) -> int:
    if isinstance(fmt, FloatFormat):
        return {"e4m3": TensorProto.FLOAT8E4M3FN, "e5m2": TensorProto.FLOAT8E5M2}[fmt.name]
    if fmt.bits == 8:
        return TensorProto.INT8 if fmt.signed else TensorProto.UINT8
    return TensorProto.INT4 if fmt.signed else TensorProto.UINT4


def storage_tensor(name: str, values: torch.Tensor, fmt) -> onnx.TensorProto:
    """An initializer in the format's storage type: int8/uint8; int4/uint4 packed two per byte (first value in
    the low nibble, as ONNX stores them; 2- and 3-bit grids are stored as 4-bit); or FP8."""
    dtype = _onnx_type(fmt)
    if dtype in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
        raw = values.to(fmt.torch_dtype).contiguous().view(torch.uint8).numpy().tobytes()
    elif dtype in (TensorProto.INT4, TensorProto.UINT4):
        u = (values.numpy().astype(np.int64).ravel() & 0xF).astype(np.uint8)
        u = np.concatenate([u, np.zeros(len(u) % 2, np.uint8)])
        raw = (u[0::2] | (u[1::2] << 4)).tobytes()
    else:
        return numpy_helper.from_array(values.numpy().astype(np.int8 if dtype == TensorProto.INT8 else np.uint8), name)
    return helper.make_tensor(name, dtype, list(values.shape), raw, raw=True)


def require_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset to at least ``version`` (int4 and blocked DequantizeLinear need 21)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < version:
            imp.version = version
    model.ir_version = max(model.ir_version, 10)


def _dequantize_weight(model: onnx.ModelProto, node: onnx.NodeProto, w_idx: int, spec: qmod.WeightSpec,
                       stored: tuple | None) -> tuple[list[onnx.NodeProto], torch.Tensor]:
    """Replace the weight input ``w_idx`` of ``node`` by DequantizeLinear of its quantized form; returns the
    new nodes and the weight scale in PyTorch layout."""
    g = model.graph
    wname = node.input[w_idx]
    w = torch.from_numpy(numpy_helper.to_array(next(i for i in g.initializer if i.name == wname)).astype(np.float32))
    out_axis, transposed = weight_axes(node)
    wt = w.T if transposed else w
    if stored is None:
        scale, zero = qmod.weight_params(wt, spec)
        values = qmod.weight_values(wt, spec, scale, zero)
    else:
        values, scale, zero = stored
    scale = scale.detach().float()
    onnx_scale, onnx_zero = scale, zero
    if transposed:
        values = values.T
        if spec.group_size:
            onnx_scale, onnx_zero = scale.T, zero.T
    attrs = {}
    if spec.group_size:
        attrs = {"axis": 0 if transposed else 1, "block_size": spec.group_size}
        require_opset(model, 21)
    elif scale.ndim == 1:
        attrs = {"axis": out_axis}
    fmt = spec.fmt
    inputs = [f"{wname}:q", f"{wname}:s"]
    g.initializer.append(storage_tensor(inputs[0], values, fmt))
    g.initializer.append(numpy_helper.from_array(onnx_scale.numpy().astype(np.float32), inputs[1]))
    if isinstance(fmt, IntFormat):
        if fmt.bits < 8:
            require_opset(model, 21)
        if fmt.bits == 8 or not fmt.symmetric:   # int8: explicit zeros (what ORT's QDQ fusions expect)
            zp = onnx_zero.expand_as(onnx_scale) if onnx_zero.ndim < onnx_scale.ndim else onnx_zero
            g.initializer.append(storage_tensor(f"{wname}:zp", zp.to(torch.int32), fmt))
            inputs.append(f"{wname}:zp")
    node.input[w_idx] = f"{wname}:dq"
    return [helper.make_node("DequantizeLinear", inputs, [f"{wname}:dq"], **attrs)], scale


def _int32_bias(model: onnx.ModelProto, node: onnx.NodeProto, x_scale: float, w_scale: torch.Tensor,
                consts: dict) -> list[onnx.NodeProto]:
    """Store the bias of a Conv/Gemm with INT8 input and weights as int32 at scale s_x * s_w (what QLinearConv
    and QGemm take)."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
        return []
    bname = node.input[2]
    b = consts[bname].astype(np.float64)
    per_channel = w_scale.ndim == 1
    b_scale = x_scale * w_scale.double().numpy()
    if b.ndim != 1 or (per_channel and b.shape[0] != w_scale.numel()):
        return []
    qb = np.clip(np.round(b / b_scale), -2**31, 2**31 - 1).astype(np.int32)
    model.graph.initializer.append(numpy_helper.from_array(qb, f"{bname}:q"))
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(b_scale, np.float32), f"{bname}:s"))
    node.input[2] = f"{bname}:dq"
    return [helper.make_node("DequantizeLinear", [f"{bname}:q", f"{bname}:s"], [f"{bname}:dq"],  # zero point 0
                             **({"axis": 0} if per_channel else {}))]


SpecFn = Callable[[str, str, int], "qmod.WeightSpec | None"]


def quantize_weights(model: onnx.ModelProto, spec_for: SpecFn, stored: dict | None = None,
                     static: bool = True) -> list[str]:
    """Store the constant weights of Conv/Gemm/MatMul nodes quantized, each rebuilt by a DequantizeLinear.

    ``spec_for(layer name, weight name, input channels)`` gives each layer's ``WeightSpec`` (None or a float
    format: leave it). ``stored``: weight name -> (values, scale, zero point) computed by PyTorch twins.
    ``static``: only layers whose activation input comes from a DequantizeLinear (W8A8); their biases become
    int32 when the weights are INT8 per channel or per tensor. Returns the names of the layers quantized.
    """
    g = model.graph
    consts = constants(model)
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    done = []
    for idx, node in enumerate(g.node):
        w_idx = weight_input(node, consts)
        if w_idx is None or node.input[w_idx] not in inits:
            continue
        wname, name = node.input[w_idx], layer_name(node, consts)
        w = consts[wname]
        in_channels = w.shape[0] if weight_axes(node)[1] else w.shape[1]
        spec = spec_for(name, wname, in_channels)
        if spec is None or spec.fmt is None:
            continue
        dq = producer.get(node.input[0])
        static_input = dq is not None and dq.op_type == "DequantizeLinear" and dq.input[1] in consts
        if static and not static_input:
            continue
        nodes, w_scale = _dequantize_weight(model, node, w_idx, spec, (stored or {}).get(wname))
        if static_input and isinstance(spec.fmt, IntFormat) and spec.fmt.bits == 8 and not spec.group_size \
                and consts[dq.input[1]].ndim == 0:
            nodes += _int32_bias(model, node, float(consts[dq.input[1]]), w_scale, consts)
        new_nodes[idx] = nodes
        done.append(name)
    nodes = []
    for idx, node in enumerate(g.node):
        nodes += new_nodes.get(idx, [])
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(model)
    return done


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


def quantize_embeddings(model: onnx.ModelProto, min_elements: int = 1 << 16) -> list[str]:
    """Weight-only INT8 for embedding tables (Gather from a constant 2-D float table of at least ``min_elements``):
    symmetric per row, looked up as integers and scaled after the lookup, so no runtime ever dequantizes the
    whole table: Gather(int8 table, ids) -> Cast -> Mul(Gather(row scales, ids)). Returns the tables' names."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done, nodes = [], []
    for n in g.node:
        table = inits.get(n.input[0]) if n.op_type == "Gather" else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(table.dims) != 2 or table.data_type != TensorProto.FLOAT \
                or table.dims[0] * table.dims[1] < min_elements:
            nodes.append(n)
            continue
        w = torch.from_numpy(numpy_helper.to_array(table).astype(np.float32))
        scale, zero = weight_qparams(w, INT8_WEIGHT, per_channel=True, axis=0)
        q = quantize(w, scale, zero, INT8_WEIGHT, 0).to(torch.int8)
        name, out = table.name, n.output[0]
        g.initializer.append(numpy_helper.from_array(q.numpy(), f"{name}:q"))
        g.initializer.append(numpy_helper.from_array(scale.numpy().astype(np.float32)[:, None], f"{name}:s"))
        nodes += [helper.make_node("Gather", [f"{name}:q", n.input[1]], [f"{out}:q"], axis=0),
                  helper.make_node("Cast", [f"{out}:q"], [f"{out}:int"], to=TensorProto.FLOAT),
                  helper.make_node("Gather", [f"{name}:s", n.input[1]], [f"{out}:s"], axis=0),
                  helper.make_node("Mul", [f"{out}:int", f"{out}:s"], [out])]
        done.append(name)
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(model)
    return done


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    kept = {x.name for x in keep}
    inputs = [i for i in model.graph.input if i.name in used or i.name not in kept]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def quantize_onnx(model_or_path, config: Int8Static, data, out: str | os.PathLike | None = None,
                  progress: bool = True, cache: dict | None = None) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize a float ONNX model to a QDQ model; writes ``out`` atomically when given. ``cache``: a dict
    kept between calls that differ only in weight grids (mixed-precision search): calibration runs once."""
    if out is not None:
        onnx_io.check_writable(out)
    model = onnx_io.load(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    model = preprocess(model)
    reduce_mean_to_global_average_pool(model)
    if isinstance(data, (str, os.PathLike)):
        data = data_mod.load_npz(data)
    if isinstance(data, dict) and all(isinstance(v, np.ndarray) for v in data.values()):
        data = check_calibration_inputs(model, dict(data))
    gnodes, outputs, reports = graph_view(model, config)
    scheme = choose_scheme(gnodes, config.scheme)
    alpha = (0.8 if scheme == "transformer" else None) if config.smooth_quant == "auto" else config.smooth_quant
    if alpha is not None:
        from smallify.quant.smooth import smooth_onnx

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
    quantize_weights(model, lambda name, wname, _: config.weight_spec(name, wname) if name in chosen else None)
    for table in quantize_embeddings(model):
        reports.append(LayerReport(table, "Gather", "quantized", "embedding table: weight-only int8 per row"))
    model.producer_name = "smallify"
    compact(model)
    onnx.checker.check_model(model)
    report = QuantReport(config.to_dict(), reports, len(qparams), samples, elapsed, scheme, alpha)
    if out is not None:
        onnx_io.save(model, out)
    return model, report
