"""Reading ONNX graphs: constants, which input of a Conv/Gemm/MatMul is its weight, layer names for people,
weight layouts, and dropping initializers nothing reads. Shared by every ONNX pass."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHT_OPS = {"Conv": "conv", "Gemm": "linear", "MatMul": "matmul"}


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
    if consts is not None and node.op_type in WEIGHT_OPS:
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


def input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def weight_axes(node: onnx.NodeProto) -> tuple[int, bool]:
    """(output-channel axis of the weight in ONNX layout, whether that layout is PyTorch's transposed)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0, False) if trans_b else (1, True)
    if node.op_type == "MatMul":
        return 1, True
    return 0, False


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    kept = {x.name for x in keep}
    inputs = [i for i in model.graph.input if i.name in used or i.name not in kept]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def check_finite_weights(model: onnx.ModelProto, selected) -> None:
    """ModelError naming the first layer converted (``selected(layer name, weight name)``) whose constant
    weight holds NaN or Inf: no method can store it, and a half-precision copy would carry it silently."""
    from smallify.errors import ModelError

    consts = constants(model)
    for node, w, name, _ in weight_layers(model):
        wname = node.input[w]
        if selected(name, wname) and not np.isfinite(consts[wname]).all():
            raise ModelError(f"weight {wname!r} of layer {name!r} holds NaN or Inf; only finite weights can be "
                             "converted: fix the model, or keep the layer in float with --skip")
