"""Is a decomposed layer faster than the original on the target runtime? Measured, once per layer shape.

Each form (the original layer, its decomposed parts) is written as a one-layer ONNX graph by hand (Conv /
MatMul + Add nodes, random weights: speed does not depend on their values) for the layer's real input shape at
the chosen batch, and the two are timed in alternating blocks (``bench_interleaved``) in ONNX Runtime or OpenVINO
with the chosen threads. Results are cached in a JSON file keyed by CPU, runtime version, threads and shapes
(``$SMALLIFY_CACHE_DIR``, default ``~/.cache/smallify``), so a layer shape is measured once per machine.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

RUNTIMES = ("onnxruntime", "openvino")


def cache_path() -> Path:
    return Path(os.environ.get("SMALLIFY_CACHE_DIR") or Path.home() / ".cache" / "smallify") / "lowrank_speed.json"


def _layer_desc(m: nn.Module) -> list:
    if isinstance(m, nn.Linear):
        return ["linear", m.in_features, m.out_features, m.bias is not None]
    return ["conv2d", m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride), list(m.padding),
            list(m.dilation), m.groups, m.bias is not None]


def _graph(parts: list[nn.Module], in_shape: list[int]):
    """A one-layer ONNX model computing ``parts`` in a row on an input of ``in_shape``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, m in enumerate(parts):
        w = rng.standard_normal(tuple(m.weight.shape)).astype(np.float32) * 0.1
        y = f"y{i}"
        if isinstance(m, nn.Linear):
            inits.append(numpy_helper.from_array(w.T.copy(), f"w{i}"))
            out = y if m.bias is None else f"mm{i}"
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [out]))
            if m.bias is not None:
                inits.append(numpy_helper.from_array(np.zeros(m.out_features, np.float32), f"b{i}"))
                nodes.append(helper.make_node("Add", [out, f"b{i}"], [y]))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            ins = [x, f"w{i}"]
            if m.bias is not None:
                inits.append(numpy_helper.from_array(np.zeros(m.out_channels, np.float32), f"b{i}"))
                ins.append(f"b{i}")
            ph, pw = m.padding
            nodes.append(helper.make_node("Conv", ins, [y], kernel_shape=list(m.kernel_size), strides=list(m.stride),
                                          pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups))
        x = y
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _runner(proto, runtime: str, threads: int, tmp: Path, name: str):
    import onnx

    path = tmp / f"{name}.onnx"
    onnx.save(proto, str(path))
    if runtime == "openvino":
        from smallify.measure.latency import openvino_runner

        return openvino_runner(path, threads)
    from smallify.measure.latency import ort_runner

    return ort_runner(path, threads)[0]


def _versions(runtime: str) -> str:
    from smallify.measure.machine import cpu_info

    if runtime == "openvino":
        import openvino

        version = openvino.__version__
    else:
        import onnxruntime

        version = onnxruntime.__version__
    return f"{cpu_info()['model']}|{runtime}-{version}"


class SpeedCache:
    """Measured layer timings: ``ms(parts, in_shape)`` times a form once and remembers it (in memory and on
    disk)."""

    def __init__(self, runtime: str, threads: int = 2, path: Path | None = None, budget_s: float = 0.6):
        self.runtime, self.threads, self.budget_s = runtime, threads, budget_s
        self.path = path or cache_path()
        self.prefix = f"{_versions(runtime)}|t{threads}"
        try:
            self.table = json.loads(self.path.read_text())
            if not isinstance(self.table, dict):
                self.table = {}
        except (OSError, ValueError):
            self.table = {}
        self.measured = 0

    def _key(self, parts, in_shape) -> str:
        return json.dumps([self.prefix, list(in_shape), [_layer_desc(p) for p in parts]], separators=(",", ":"))

    def compare(self, original: nn.Module, decomposed: list[nn.Module], in_shape: list[int]) -> tuple[float, float]:
        """(ms of the original layer, ms of the decomposed parts) on ``in_shape`` (batch first), from the cache
        or timed now in alternating blocks."""
        keys = self._key([original], in_shape), self._key(decomposed, in_shape)
        if all(isinstance(self.table.get(k), (int, float)) for k in keys):
            return float(self.table[keys[0]]), float(self.table[keys[1]])
        from smallify.measure.latency import bench_interleaved

        feed = {"x": np.random.default_rng(1).standard_normal(in_shape).astype(np.float32)}
        with tempfile.TemporaryDirectory() as tmp:
            runners = {"a": _runner(_graph([original], in_shape), self.runtime, self.threads, Path(tmp), "a"),
                       "b": _runner(_graph(decomposed, in_shape), self.runtime, self.threads, Path(tmp), "b")}
            stats = bench_interleaved(runners, {"a": feed, "b": feed}, warmup=2, min_runs=5,
                                      budget_s=self.budget_s, block_s=0.05)
            del runners
        self.measured += 1
        a, b = stats["a"].median_ms, stats["b"].median_ms
        self.table[keys[0]], self.table[keys[1]] = a, b
        return a, b

    def flush(self) -> None:
        """Write the table back (atomically; a cache that cannot be written is only a lost cache)."""
        if not self.measured:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self.table, f)
            os.replace(tmp, self.path)
        except OSError:
            pass
