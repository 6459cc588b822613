"""Latency measured side by side: every model runs in the same process, with the same thread count, rounds
interleaved (A B C A B C ...) so that machine noise hits all of them alike."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> "LatencyStats":
        a = np.asarray(seconds) * 1e3
        return cls(float(np.median(a)), float(np.percentile(a, 90)), len(a))


def has_fp8_activations(path: str | os.PathLike) -> bool:
    """Whether the model quantizes activations to FP8 (a QuantizeLinear with an FP8 zero point)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fp8 = {i.name for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in fp8 for n in model.graph.node)


def ort_runner(path: str | os.PathLike, threads: int = 2, spinning: bool = False) -> tuple[Callable, list]:
    """An ONNX Runtime CPU session; returns ``run(feed)`` and the session's inputs. Intra-op spinning is off
    unless ``spinning``: these sessions are timed in turn with others (``bench_interleaved``, ``smallify
    bench``, the demo, the benchmarks), and a session whose worker threads keep spinning after its block steals
    the cores from the next one (2 cores: a sub-millisecond model's pruned/unpruned ratio read 0.36 in one
    timing and 1.61 in the next with spinning on; 0.66-0.69 three times with it off)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if has_fp8_activations(path):
        # ORT 1.31's MatMulIntegerToFloat fusion takes FP8 QuantizeLinear for an integer one and fails to load
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()][:1]
    return (lambda feed: session.run(outputs, feed)[0]), session.get_inputs()


def torch_runner(model: torch.nn.Module, threads: int = 2) -> Callable:
    model = model.eval()

    def run(feed: dict) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(*[torch.from_numpy(v) for v in feed.values()]).numpy()

    return run


def random_feed(inputs, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching an ORT session's input list, with the batch axis set to ``batch``."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i in inputs:
        shape = [batch if k == 0 else (d if isinstance(d, int) else 1) for k, d in enumerate(i.shape)]
        if "float" in i.type:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            feed[i.name] = rng.integers(0, 100, shape).astype(np.int64)
    return feed


def bench_interleaved(runners: dict[str, Callable], feeds: dict[str, dict], warmup: int = 2,
                      min_runs: int = 10, max_runs: int = 100_000, budget_s: float = 10.0,
                      block_s: float = 0.3) -> dict[str, LatencyStats]:
    """Time every runner on its feed, in rounds: each round gives every runner one block (``warmup`` untimed
    calls, then timed calls for ``block_s``). Blocks rather than single calls, because runtimes' worker threads
    spin for a while after a call and would steal the cores from whichever runner comes next (ONNX Runtime
    sessions from ``ort_runner`` have intra-op spinning turned off for the same reason). Stops after
    ``budget_s`` once every runner has ``min_runs`` timed calls, or at ``max_runs`` calls each. (``max_runs``
    used to be 400: a 0.2 ms model then got one block in all, and per-session bias decided its batch-1 ratio.)"""
    times: dict[str, list[float]] = {name: [] for name in runners}
    start = time.perf_counter()
    while True:
        for name, run in runners.items():
            feed = feeds[name]
            for _ in range(warmup):
                run(feed)
            block = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                run(feed)
                t1 = time.perf_counter()
                times[name].append(t1 - t0)
                if t1 - block >= block_s or len(times[name]) >= max_runs:
                    break
        enough = min(len(t) for t in times.values()) >= min_runs
        if (enough and time.perf_counter() - start > budget_s) or all(len(t) >= max_runs for t in times.values()):
            break
    return {name: LatencyStats.of(t) for name, t in times.items()}


def openvino_runner(model, threads: int = 2, config: dict | None = None) -> Callable:
    """An OpenVINO CPU compiled model (from an ONNX/IR path or an ov.Model); ``run(feed)`` -> first output.
    OpenVINO's defaults apply unless ``config`` overrides them (on AMX CPUs it runs FP32 models in BF16)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(model) if isinstance(model, (str, os.PathLike)) else model, "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", **(config or {})})
    request = compiled.create_infer_request()
    out = compiled.outputs[0]

    def run(feed: dict) -> np.ndarray:
        return request.infer(list(feed.values()))[out]

    return run
