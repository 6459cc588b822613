"""ONNX of weight-shared models in the form that keeps the indices: each shared weight is computed in the
graph from its codebook and its bit-packed index table (uint8 bytes unpacked with BitShift / BitwiseAnd, then
GatherElements), so the file holds ~log2(k+1) bits per weight instead of 32. ONNX Runtime folds these constant
subgraphs into float weights when the session starts: the latency is the expanded model's, the file is smaller.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn


def index_bits(alphabet: int) -> int:
    """Bits per index in the ONNX form: 1, 2, 4 or 8 (a byte holds a whole number of indices)."""
    need = max(1, math.ceil(math.log2(alphabet)))
    return next(b for b in (1, 2, 4, 8) if b >= need)


def pack_rows(symbols: np.ndarray, bits: int) -> np.ndarray:
    """(R, N) symbols < 2^bits -> (R, ceil(N / per)) uint8, symbol s of a byte at bits s*bits .. (lowest first)."""
    per = 8 // bits
    r, n = symbols.shape
    padded = np.zeros((r, -(-n // per) * per), dtype=np.uint8)
    padded[:, :n] = symbols
    parts = padded.reshape(r, -1, per).astype(np.uint16)
    out = np.zeros(parts.shape[:2], dtype=np.uint16)
    for s in range(per):
        out |= parts[:, :, s] << (s * bits)
    return out.astype(np.uint8)


def _unpack_nodes(prefix: str, packed: str, bits: int, rows: int, n: int, nodes: list, inits: list) -> str:
    """Nodes turning the packed uint8 table ``packed`` (R, B) back into (R, n) int64 indices; returns its name."""
    per = 8 // bits
    if per == 1:
        nodes.append(helper.make_node("Cast", [packed], [f"{prefix}_idx"], to=onnx.TensorProto.INT64))
        return f"{prefix}_idx"
    mask = f"{prefix}_mask"
    inits.append(numpy_helper.from_array(np.array(2 ** bits - 1, dtype=np.uint8), mask))
    axes = f"{prefix}_axes"
    inits.append(numpy_helper.from_array(np.array([2], dtype=np.int64), axes))
    parts = []
    for s in range(per):
        shift = f"{prefix}_shift{s}"
        inits.append(numpy_helper.from_array(np.array(s * bits, dtype=np.uint8), shift))
        nodes.append(helper.make_node("BitShift", [packed, shift], [f"{prefix}_sh{s}"], direction="RIGHT"))
        nodes.append(helper.make_node("BitwiseAnd", [f"{prefix}_sh{s}", mask], [f"{prefix}_and{s}"]))
        nodes.append(helper.make_node("Unsqueeze", [f"{prefix}_and{s}", axes], [f"{prefix}_u{s}"]))
        parts.append(f"{prefix}_u{s}")
    nodes.append(helper.make_node("Concat", parts, [f"{prefix}_cat"], axis=2))              # (R, B, per)
    shape = f"{prefix}_flat_shape"
    inits.append(numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape))
    nodes.append(helper.make_node("Reshape", [f"{prefix}_cat", shape], [f"{prefix}_flat"]))  # (R, B * per)
    starts, ends, ax = f"{prefix}_s0", f"{prefix}_s1", f"{prefix}_sax"
    inits += [numpy_helper.from_array(np.array([0], dtype=np.int64), starts),
              numpy_helper.from_array(np.array([n], dtype=np.int64), ends),
              numpy_helper.from_array(np.array([1], dtype=np.int64), ax)]
    nodes.append(helper.make_node("Slice", [f"{prefix}_flat", starts, ends, ax], [f"{prefix}_cut"]))
    nodes.append(helper.make_node("Cast", [f"{prefix}_cut"], [f"{prefix}_idx"], to=onnx.TensorProto.INT64))
    return f"{prefix}_idx"


def keep_indices(proto: onnx.ModelProto, layers: dict[str, nn.Module], initializers: dict[str, str]) -> int:
    """Replace each shared layer's float weight initializer in ``proto`` by codebook + packed indices +
    the nodes that expand them; ``initializers``: initializer name -> layer name (``layers``: name -> shared
    layer). Returns the number of weights replaced."""
    by_name = {i.name: i for i in proto.graph.initializer}
    nodes, inits, done = [], [], 0
    for init_name, layer in initializers.items():
        m = layers[layer]
        init = by_name[init_name]
        stored = numpy_helper.to_array(init)
        r, n = m.rows
        codebook = m.codebook_values().detach().float().numpy()
        k = codebook.shape[1]
        idx = m.indices.reshape(r, n).numpy().astype(np.int64)
        if m.mask is not None:          # a pruned weight reads the extra zero entry k
            idx = np.where(m.mask.reshape(r, n).numpy(), idx, k)
            codebook = np.concatenate([codebook, np.zeros((r, 1), np.float32)], axis=1)
        bits = index_bits(codebook.shape[1])
        prefix = f"{init_name}_shared"
        inits.append(numpy_helper.from_array(codebook.astype(np.float32), f"{prefix}_codebook"))
        inits.append(numpy_helper.from_array(pack_rows(idx.astype(np.uint8), bits), f"{prefix}_packed"))
        index = _unpack_nodes(prefix, f"{prefix}_packed", bits, r, n, nodes, inits)
        nodes.append(helper.make_node("GatherElements", [f"{prefix}_codebook", index], [f"{prefix}_rows"], axis=1))
        weight = m.weight.detach().float().numpy()
        transposed = stored.shape != weight.shape
        shape = f"{prefix}_shape"
        inits.append(numpy_helper.from_array(np.array(weight.shape, dtype=np.int64), shape))
        out = init_name if not transposed else f"{prefix}_w"
        nodes.append(helper.make_node("Reshape", [f"{prefix}_rows", shape], [out]))
        if transposed:
            nodes.append(helper.make_node("Transpose", [out], [init_name], perm=[1, 0]))
        proto.graph.initializer.remove(init)
        done += 1
    proto.graph.initializer.extend(inits)
    for node in reversed(nodes):
        proto.graph.node.insert(0, node)
    return done
