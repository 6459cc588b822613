"""Latency measured in separate processes: each model timed in its own fresh Python process, models taken in
turn, several rounds. Timing two ONNX Runtime sessions in one process on a 2-core machine misleads (an idle
session's threads spin and steal the other's cores): a MobileNet-style INT8 model read 0.59x of FP32 in one
process and 1.5x in separate ones.

    from smallify.measure.isolated import bench_isolated
    table = bench_isolated({"fp32": "m.onnx", "int8": "m.int8.onnx"}, batches=(1, 32))
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from smallify.errors import SmallifyError

RUNTIMES = ("onnxruntime", "openvino")


def time_in_process(path: str | os.PathLike, runtime: str = "onnxruntime", batch: int = 1, threads: int = 2,
                    seconds: float = 3.0) -> float:
    """Median latency (ms) of one model, measured in a fresh Python process."""
    return stats_in_process(path, runtime, batch, threads, seconds)["median_ms"]


def stats_in_process(path: str | os.PathLike, runtime: str = "onnxruntime", batch: int = 1, threads: int = 2,
                     seconds: float = 3.0) -> dict:
    """{'median_ms', 'p90_ms', 'runs'} of one model, measured in a fresh Python process that imports only
    numpy and the runtime (measure/child_timer.py, run by path: no smallify or torch start-up)."""
    if runtime not in RUNTIMES:
        raise SmallifyError(f"runtime {runtime!r} is not supported; accepted: {', '.join(RUNTIMES)}")
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child_timer.py")
    proc = subprocess.run([sys.executable, child, str(path), runtime, str(batch), str(threads), str(seconds)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SmallifyError(f"timing {path} in {runtime} failed: {last[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_isolated(models: dict[str, str | os.PathLike], batches=(1, 32), runtime: str = "onnxruntime",
                   threads: int = 2, seconds: float = 3.0, rounds: int = 3, progress=None) -> dict[tuple[str, int], float]:
    """(label, batch) -> median over ``rounds`` of each fresh process's median latency (ms); models alternate
    within each round so that slow drifts of the machine hit every model alike. ``progress(message)`` is called
    before each measurement."""
    runs: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for batch in batches:
            for label, path in models.items():
                if progress is not None:
                    progress(f"round {r + 1}/{rounds}: {label} batch {batch} ({runtime})")
                runs.setdefault((label, batch), []).append(time_in_process(path, runtime, batch, threads, seconds))
    return {k: float(np.median(v)) for k, v in runs.items()}


def speed_check(float_path, quantized, round_trips: dict | None = None, batches=(1, 32), rounds: int = 2,
                seconds: float = 1.0, progress=None) -> str:
    """Time a float ONNX model and its quantized form (ONNX Runtime, 2 threads, each in a fresh process,
    alternating) and say plainly whether the quantized one is faster on this CPU; ``round_trips`` (operator ->
    count of float round trips, from the quantization report) explains a missing speed-up."""
    import onnx

    from smallify.measure.machine import cpu_summary

    first = onnx.load(str(quantized), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if first and first[0].HasField("dim_value"):
        batches = (first[0].dim_value,)          # a fixed batch dimension: time that batch only
    times = bench_isolated({"float": str(float_path), "quantized": str(quantized)}, batches, "onnxruntime", 2,
                           seconds, rounds, progress=progress)
    ratios = {b: times["quantized", b] / times["float", b] for b in batches}
    lines = [f"speed check (ONNX Runtime, 2 threads, each model in its own process; {cpu_summary()}):"]
    lines += [f"  batch {b}: {times['float', b]:.2f} ms float, {times['quantized', b]:.2f} ms quantized: "
              f"{r:.2f}x" for b, r in ratios.items()]
    slower = [b for b, r in ratios.items() if r >= 1.0]
    if slower:
        why = ", ".join(f"{op} x{n}" for op, n in sorted((round_trips or {}).items()))
        lines.append(f"  no speed-up at batch {', '.join(map(str, slower))} on this CPU: keep the float model there"
                     + (f" (operators without integer kernels, each a float round trip: {why})" if why else ""))
    return "\n".join(lines)
