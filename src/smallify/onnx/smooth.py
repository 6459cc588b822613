"""SmoothQuant (Xiao et al., 2023) on ONNX graphs: migrate activation outliers into the weights.

For every activation tensor x that feeds MatMuls with constant weights W (K x N), with per-input-channel
ranges a_k = max|x_k| (calibrated) and w_k = max over those weights of |W_k,:|:

    s_k = a_k^alpha / w_k^(1 - alpha);   x' = x / s (a Mul node, read only by those MatMuls);   W'_k,: = s_k W_k,:

x' W' = x W exactly in float; x' has flatter channels, so its per-tensor INT8 scale wastes less range.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from smallify.quant import observers


def _weight_matmuls(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMul nodes that multiply it by a constant 2-D weight."""
    from smallify.onnx.graph import constants, weight_input

    consts = constants(model)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and weight_input(n, consts) == 1 and n.input[0] not in consts:
            groups.setdefault(n.input[0], []).append(n)
    return groups


def smooth_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_k = a_k^alpha / w_k^(1-alpha), with w_k the largest |W_k,:| over all the weights (K x N each)."""
    w = torch.stack([wt.abs().amax(1) for wt in weights]).amax(0)
    s = act_absmax.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp(1e-4, 1e4)


def smooth_onnx(model: onnx.ModelProto, data, config, alpha: float, progress: bool = True) -> int:
    """Apply SmoothQuant with strength ``alpha`` in place; returns how many tensors were smoothed."""
    from smallify.onnx.calibrate import calibrate

    groups = _weight_matmuls(model)
    if not groups:
        return 0
    obs, _ = calibrate(model, list(groups), data, config, progress,
                       make_observer=lambda t: observers.MinMaxObserver(axis=-1, name=t), what="smoothing")
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    new_nodes: dict[str, onnx.NodeProto] = {}
    for t, nodes in groups.items():
        lo, hi = obs[t].range()
        weights = [torch.from_numpy(numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)) for n in nodes]
        if any(w.shape[0] != lo.numel() for w in weights):
            continue
        s = smooth_factors(torch.maximum(lo.abs(), hi.abs()), weights, alpha)
        for n, w in zip(nodes, weights):
            smoothed = numpy_helper.from_array((w * s[:, None]).numpy(), n.input[1])
            if readers[n.input[1]] == 1:          # its only reader: the weight keeps its name (and layer name)
                inits[n.input[1]].CopyFrom(smoothed)
                continue
            # a weight shared with other layers: this layer's smoothed copy gets a name of its own
            name, k = f"{n.input[1]}:smoothed", 1
            while name in inits:
                k += 1
                name = f"{n.input[1]}:smoothed{k}"
            smoothed.name = name
            model.graph.initializer.append(smoothed)
            inits[name] = smoothed
            n.input[1] = name
        inv = f"{t}:smooth_scale"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).numpy().astype(np.float32), inv))
        new_nodes[t] = helper.make_node("Mul", [t, inv], [f"{t}:smoothed"])
        for n in nodes:
            n.input[0] = f"{t}:smoothed"
    ordered = []
    for t in (i.name for i in model.graph.input):
        if t in new_nodes:
            ordered.append(new_nodes[t])
    for n in model.graph.node:
        ordered.append(n)
        for o in n.output:
            if o in new_nodes:
                ordered.append(new_nodes[o])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    from smallify.onnx.graph import drop_unused_initializers

    drop_unused_initializers(model)
    return len(new_nodes)
