"""Where activations get quantized: one rule, on a framework-neutral view of the graph.

The rule produces the placement ONNX Runtime's x86 integer kernels fuse: every input of a quantized
Conv/Gemm/MatMul, Add and average pool is quantized, and so is its output; a ReLU right after such an op is
absorbed (the quantizer is placed after the ReLU, and the ReLU itself becomes a clamp at zero point 0);
shape-only and max-pool ops pass quantized tensors through with the same parameters so that the runtime can
drop their Q/DQ pair and keep integers flowing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

COMPUTE = {"conv", "linear", "matmul", "act_matmul"}   # a quantized weight; act_matmul: two activations
INT_OPS = {"add", "mul", "avgpool"}       # integer kernels with their own output scale (QLinearAdd/Mul/...)
PASS = {"maxpool", "flatten", "reshape", "transpose", "squeeze", "unsqueeze", "identity"}
ACT = {"relu"}


@dataclass
class GNode:
    name: str
    kind: str                   # one of the sets above, or 'other'
    inputs: list[str]           # activation tensors only (no weights, no constants)
    outputs: list[str]
    quantize: bool = True       # False for compute layers left in float (skipped, unsupported)


@dataclass
class Placement:
    calibrated: list[str] = field(default_factory=list)       # tensors that get their own range
    shared: dict[str, str] = field(default_factory=dict)      # tensor -> tensor whose parameters it reuses
    absorbed_relus: list[str] = field(default_factory=list)   # ReLU node names folded into the quantizer
    quantized_nodes: list[str] = field(default_factory=list)  # compute / integer nodes that run in INT8
    only_for: dict[str, set[str]] = field(default_factory=dict)  # tensor -> the only consumers that read it quantized

    def tensors(self) -> list[str]:
        return self.calibrated + list(self.shared)


TRANSFORMER_MARKERS = {"layernorm", "softmax"}
SCHEMES = ("auto", "cnn", "transformer")


def choose_scheme(nodes: list[GNode], scheme: str = "auto") -> str:
    """'transformer' when the graph holds LayerNorm or Softmax, else 'cnn' (unless the user chose)."""
    if scheme != "auto":
        return scheme
    return "transformer" if any(n.kind in TRANSFORMER_MARKERS for n in nodes) else "cnn"


def place(nodes: list[GNode], graph_outputs: set[str], scheme: str = "cnn") -> Placement:
    """Choose the tensors to quantize. ``nodes`` must be in topological order.

    'cnn': integer chains (inputs and outputs of Conv/Gemm/Add/pool quantized, ReLU absorbed), which ONNX
    Runtime fuses into QLinearConv/QLinearAdd. 'transformer': only the activation inputs of MatMul/Gemm with
    constant weights; residual adds, LayerNorm, Softmax and
    GELU stay in float, where their range and precision matter. The activation x activation products of
    attention stay float too: in ``benchmarks/ptq_minilm.py`` quantizing them gave cosine 0.9979 against
    0.9982 without, and 11.32 against 8.75 ms in OpenVINO at batch 1 (README).
    """
    if scheme == "transformer":
        p = Placement()
        for n in nodes:
            if n.kind in COMPUTE - {"act_matmul"} and n.quantize:
                for t in n.inputs:
                    if t not in p.calibrated and t not in graph_outputs:
                        p.calibrated.append(t)
                    p.only_for.setdefault(t, set()).add(n.name)
                p.quantized_nodes.append(n.name)
        return p
    consumers: dict[str, list[GNode]] = {}
    for n in nodes:
        for t in n.inputs:
            consumers.setdefault(t, []).append(n)
    p = Placement()
    chosen: set[str] = set()

    def add(t: str) -> None:
        if t not in chosen and t not in p.shared and t not in graph_outputs:
            chosen.add(t)
            p.calibrated.append(t)

    def output_of(n: GNode) -> None:
        out = n.outputs[0]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].kind in ACT and out not in graph_outputs:
            p.absorbed_relus.append(users[0].name)
            add(users[0].outputs[0])
        else:
            add(out)

    for n in nodes:
        if n.kind in COMPUTE | INT_OPS and n.quantize:
            for t in n.inputs:
                add(t)
            output_of(n)
            p.quantized_nodes.append(n.name)
        elif n.kind in PASS and n.inputs and n.inputs[0] in chosen | set(p.shared):
            src = n.inputs[0]
            out = n.outputs[0]
            if out not in graph_outputs and out not in chosen:
                p.shared[out] = p.shared.get(src, src)
    return p
