"""Writing quantized weights into ONNX graphs: storage types (int8, packed int4, FP8), DequantizeLinear per
channel or per block, int32 biases for integer kernels, and int8 embedding tables. Used by the ONNX path and
by ``export_onnx`` alike, so both produce the same graph shape."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from smallify.onnx.graph import (
    constants,
    drop_unused_initializers,
    layer_name,
    weight_axes,
    weight_input,
    weight_layers,
)
from smallify.quant import modules as qmod
from smallify.quant.primitives import (
    INT8_WEIGHT,
    FloatFormat,
    IntFormat,
    quantize,
    weight_qparams,
)


def onnx_type(fmt) -> int:
    if isinstance(fmt, FloatFormat):
        return {"e4m3": TensorProto.FLOAT8E4M3FN, "e5m2": TensorProto.FLOAT8E5M2}[fmt.name]
    if fmt.bits > 4:       # 5..8-bit grids are stored in 8 bits (packed tighter only in the .smallify container)
        return TensorProto.INT8 if fmt.signed else TensorProto.UINT8
    return TensorProto.INT4 if fmt.signed else TensorProto.UINT4


def storage_tensor(name: str, values: torch.Tensor, fmt) -> onnx.TensorProto:
    """An initializer in the format's storage type: int8/uint8 (5- to 8-bit grids); int4/uint4 packed two per
    byte (first value in the low nibble, as ONNX stores them; 2- and 3-bit grids are stored as 4-bit); or FP8."""
    dtype = onnx_type(fmt)
    if dtype in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
        raw = values.to(fmt.torch_dtype).contiguous().view(torch.uint8).numpy().tobytes()
    elif dtype in (TensorProto.INT4, TensorProto.UINT4):
        u = (values.numpy().astype(np.int64).ravel() & 0xF).astype(np.uint8)
        u = np.concatenate([u, np.zeros(len(u) % 2, np.uint8)])
        raw = (u[0::2] | (u[1::2] << 4)).tobytes()
    else:
        return numpy_helper.from_array(values.numpy().astype(np.int8 if dtype == TensorProto.INT8 else np.uint8), name)
    return helper.make_tensor(name, dtype, list(values.shape), raw, raw=True)


def needs_opset_21(spec) -> bool:
    """int4 storage and blocked (per-group) DequantizeLinear exist from opset 21 on."""
    return spec is not None and (bool(spec.group_size) or (isinstance(spec.fmt, IntFormat) and spec.fmt.bits <= 4))


def require_opset(model: onnx.ModelProto, version: int) -> None:
    """Convert ``model`` in place to default-domain opset ``version`` when it is older (onnx's version
    converter, operator by operator)."""
    from smallify.onnx.prepare import opset_of, upgrade_opset

    if opset_of(model) < version:
        model.CopyFrom(upgrade_opset(model, version))


def unique_prefix(model: onnx.ModelProto, base: str) -> str:
    """``base``, or ``base~2``, ``base~3``... whichever no tensor of the graph uses yet as ``prefix:...``."""
    taken = {i.name.rsplit(":", 1)[0] for i in model.graph.initializer if ":" in i.name}
    taken |= {o.rsplit(":", 1)[0] for n in model.graph.node for o in n.output if ":" in o}
    prefix, k = base, 1
    while prefix in taken:
        k += 1
        prefix = f"{base}~{k}"
    return prefix


def _dequantize_weight(model: onnx.ModelProto, node: onnx.NodeProto, w_idx: int, spec: qmod.WeightSpec,
                       stored: tuple | None) -> tuple[list[onnx.NodeProto], torch.Tensor]:
    """Replace the weight input ``w_idx`` of ``node`` by DequantizeLinear of its quantized form; returns the
    new nodes and the weight scale in PyTorch layout."""
    g = model.graph
    wname = node.input[w_idx]
    prefix = unique_prefix(model, wname)
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
    elif scale.ndim == 1:
        attrs = {"axis": out_axis}
    fmt = spec.fmt
    inputs = [f"{prefix}:q", f"{prefix}:s"]
    g.initializer.append(storage_tensor(inputs[0], values, fmt))
    g.initializer.append(numpy_helper.from_array(onnx_scale.numpy().astype(np.float32), inputs[1]))
    if isinstance(fmt, IntFormat):
        if fmt.bits > 4 or not fmt.symmetric:    # stored as int8: explicit zeros (what ORT's QDQ fusions expect)
            zp = onnx_zero.expand_as(onnx_scale) if onnx_zero.ndim < onnx_scale.ndim else onnx_zero
            g.initializer.append(storage_tensor(f"{prefix}:zp", zp.to(torch.int32), fmt))
            inputs.append(f"{prefix}:zp")
    node.input[w_idx] = f"{prefix}:dq"
    return [helper.make_node("DequantizeLinear", inputs, [f"{prefix}:dq"], **attrs)], scale


def _int32_bias(model: onnx.ModelProto, node: onnx.NodeProto, x_scale: float, w_scale: torch.Tensor,
                consts: dict, made: dict | None = None) -> list[onnx.NodeProto]:
    """Store the bias of a Conv/Gemm with INT8 input and weights as int32 at scale s_x * s_w (what QLinearConv
    and QGemm take). ``made``: (bias, scales) -> DequantizeLinear output already written, so that layers sharing
    a bias at the same scales read one copy."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
        return []
    bname = node.input[2]
    b = consts[bname].astype(np.float64)
    per_channel = w_scale.ndim == 1
    b_scale = x_scale * w_scale.double().numpy()
    if b.ndim != 1 or (per_channel and b.shape[0] != w_scale.numel()):
        return []
    key = (bname, np.asarray(b_scale, np.float32).tobytes())
    if made is not None and key in made:
        node.input[2] = made[key]
        return []
    qb = np.clip(np.round(b / b_scale), -2**31, 2**31 - 1).astype(np.int32)
    p = unique_prefix(model, bname)      # a bias shared by layers whose input scales differ: one copy each
    if made is not None:
        made[key] = f"{p}:dq"
    model.graph.initializer.append(numpy_helper.from_array(qb, f"{p}:q"))
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(b_scale, np.float32), f"{p}:s"))
    node.input[2] = f"{p}:dq"
    return [helper.make_node("DequantizeLinear", [f"{p}:q", f"{p}:s"], [f"{p}:dq"],  # zero point 0
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
    if any(needs_opset_21(spec_for(name, node.input[w], ch)) for node, w, name, ch in weight_layers(model)):
        require_opset(model, 21)           # before any edit: the converter sees the float graph's operators
    g = model.graph
    consts = constants(model)
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    done = []
    made: dict[tuple, tuple[str, torch.Tensor]] = {}   # a weight read by several layers: one quantized copy
    made_bias: dict[tuple, str] = {}
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
        key = (wname, repr(spec), weight_axes(node))
        if key in made:
            nodes, (node.input[w_idx], w_scale) = [], made[key]
        else:
            nodes, w_scale = _dequantize_weight(model, node, w_idx, spec, (stored or {}).get(wname))
            made[key] = (node.input[w_idx], w_scale)
        if static_input and isinstance(spec.fmt, IntFormat) and spec.fmt.bits > 4 and not spec.group_size \
                and consts[dq.input[1]].ndim == 0:
            nodes += _int32_bias(model, node, float(consts[dq.input[1]]), w_scale, consts, made_bias)
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


def quantize_embeddings(model: onnx.ModelProto, min_elements: int = 1 << 16) -> list[str]:
    """Weight-only INT8 for embedding tables (Gather from a constant 2-D float table of at least ``min_elements``):
    symmetric per row, looked up as integers and scaled after the lookup, so no runtime ever dequantizes the
    whole table: Gather(int8 table, ids) -> Cast -> Mul(Gather(row scales, ids)). Returns the tables' names."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done, nodes = [], []
    made: dict[str, str] = {}      # a table read by several Gathers (tied, shared): one int8 copy
    for n in g.node:
        table = inits.get(n.input[0]) if n.op_type == "Gather" else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(table.dims) != 2 or table.data_type != TensorProto.FLOAT \
                or table.dims[0] * table.dims[1] < min_elements:
            nodes.append(n)
            continue
        if table.name not in made:
            w = torch.from_numpy(numpy_helper.to_array(table).astype(np.float32))
            scale, zero = weight_qparams(w, INT8_WEIGHT, per_channel=True, axis=0)
            q = quantize(w, scale, zero, INT8_WEIGHT, 0).to(torch.int8)
            made[table.name] = p = unique_prefix(model, table.name)    # a tied LM head may hold table:q already
            g.initializer.append(numpy_helper.from_array(q.numpy(), f"{p}:q"))
            g.initializer.append(numpy_helper.from_array(scale.numpy().astype(np.float32)[:, None], f"{p}:s"))
            done.append(table.name)
        p, out = made[table.name], n.output[0]
        nodes += [helper.make_node("Gather", [f"{p}:q", n.input[1]], [f"{out}:q"], axis=0),
                  helper.make_node("Cast", [f"{out}:q"], [f"{out}:int"], to=TensorProto.FLOAT),
                  helper.make_node("Gather", [f"{p}:s", n.input[1]], [f"{out}:s"], axis=0),
                  helper.make_node("Mul", [f"{out}:int", f"{out}:s"], [out])]
    del g.node[:]
    g.node.extend(nodes)
    drop_unused_initializers(model)
    return done
