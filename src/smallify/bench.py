"""Side-by-side tables of size and latency, shared by ``smallify bench``, the demo and the benchmarks."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from smallify.onnx import io as onnx_io
from smallify.measure.latency import bench_interleaved, openvino_runner, ort_runner, random_feed
from smallify.measure.machine import cpu_info, cpu_summary
from smallify.measure.size import file_size, format_bytes
from smallify.progress import track


@dataclass
class Row:
    name: str
    size_bytes: int | None = None
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)   # batch -> {median, p90}
    metrics: dict[str, float] = field(default_factory=dict)                 # e.g. top1


RUNTIMES = ("onnxruntime", "openvino")


def bench_onnx_files(paths: list[str], batches: list[int], threads: int = 2, budget_s: float = 10.0,
                     runtimes: tuple[str, ...] = ("onnxruntime",), isolate: bool = True, rounds: int = 3,
                     progress: bool = False) -> list[Row]:
    """Every model in every runtime at every batch size. ``isolate`` (default): each measurement in a fresh
    process of its own (measure/isolated.py), models alternating, ``rounds`` rounds; medians over the rounds.
    Otherwise all sessions live in this process and are timed in one interleaved loop per batch size, which
    can mislead: one session's threads disturb the next (a MobileNet-style INT8 model read 0.59x of FP32
    interleaved and 1.5x in separate processes). ``budget_s``: seconds of timing per batch size."""
    from smallify.errors import ConfigError

    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or not runtimes:
        raise ConfigError(f"runtime {bad or runtimes!r} is not supported; accepted: {', '.join(RUNTIMES)}")
    for p in paths:
        onnx_io.load(p)  # clear errors for missing / corrupt files
    models = {}     # row name -> (path, runtime)
    for p, label in zip(paths, _labels(paths)):
        for rt in runtimes:
            models[f"{label} [{rt}]" if len(runtimes) > 1 else label] = (str(p), rt)
    rows = {k: Row(k, file_size(path)) for k, (path, _) in models.items()}
    if isolate:
        _bench_isolated(models, rows, batches, threads, budget_s, rounds, progress)
        return list(rows.values())
    runners, inputs = {}, None
    for key, (path, rt) in models.items():
        if rt == "onnxruntime":
            run, ins = ort_runner(path, threads)
            inputs = inputs or ins
        else:
            run = openvino_runner(path, threads)
        runners[key] = run
    if inputs is None:
        inputs = ort_runner(paths[0], threads)[1]
    for b in track(batches, "timing (interleaved)", progress):
        feed = random_feed(inputs, b)
        stats = bench_interleaved(runners, {k: feed for k in runners}, budget_s=budget_s)
        for k, s in stats.items():
            rows[k].latency_ms[b] = {"median": s.median_ms, "p90": s.p90_ms}
    return list(rows.values())


def _labels(paths: list) -> list[str]:
    """Row names: file names where they tell the models apart, else the paths as given; a file named twice
    gets a second row ('name #2'), so that repeated timings of one model can be compared."""
    names = [os.path.basename(str(p)) for p in paths]
    if len(set(names)) < len(set(map(str, paths))):
        names = [str(p) for p in paths]
    labels, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        labels.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return labels


def _bench_isolated(models: dict, rows: dict, batches, threads: int, budget_s: float, rounds: int,
                    progress: bool) -> None:
    from smallify.measure.isolated import stats_in_process

    seconds = max(0.5, budget_s / (rounds * len(models)))
    jobs = [(r, b, key) for r in range(rounds) for b in batches for key in models]    # models alternate
    runs: dict = {}
    for r, b, key in track(jobs, "timing, each model in its own process", progress):
        path, rt = models[key]
        runs.setdefault((key, b), []).append(stats_in_process(path, rt, b, threads, seconds))
    for (key, b), stats in runs.items():
        rows[key].latency_ms[b] = {"median": float(np.median([s["median_ms"] for s in stats])),
                                   "p90": float(np.median([s["p90_ms"] for s in stats]))}


def wide_console() -> Console:
    """A console that does not squeeze tables when stdout is a file or a pipe (CI logs, README figures)."""
    return Console() if sys.stdout.isatty() else Console(width=220)


def print_table(rows: list[Row], title: str, console: Console | None = None) -> None:
    console = console or wide_console()
    base = rows[0]
    batches = sorted({b for r in rows for b in r.latency_ms})
    metric_names = [m for m in dict.fromkeys(k for r in rows for k in r.metrics)]
    t = Table(title=title, caption=cpu_summary())            # ratios differ between CPUs: say which one
    t.add_column("model", overflow="fold")          # narrow terminals: names and numbers wrap, never cut
    for m in metric_names:
        t.add_column(m, justify="right", overflow="fold")
    t.add_column("size", justify="right", overflow="fold")
    t.add_column("× size", justify="right", overflow="fold")
    for b in batches:
        t.add_column(f"b{b} median ms", justify="right", overflow="fold")
        t.add_column(f"b{b} p90", justify="right", overflow="fold")
        t.add_column(f"× b{b}", justify="right", overflow="fold")
    for r in rows:
        cells = [r.name] + [f"{r.metrics[m]:.4f}" if m in r.metrics else "" for m in metric_names]
        if r.size_bytes is not None and base.size_bytes:
            cells += [format_bytes(r.size_bytes), f"{r.size_bytes / base.size_bytes:.3f}"]
        else:
            cells += ["", ""]
        for b in batches:
            lat, ref = r.latency_ms.get(b), base.latency_ms.get(b)
            cells += [f"{lat['median']:.2f}", f"{lat['p90']:.2f}", f"{lat['median'] / ref['median']:.2f}"] if lat and ref \
                else ["", "", ""]
        t.add_row(*[escape(c) for c in cells])   # names like 'model.onnx [openvino]' are not markup
    console.print(t)


def write_json(rows: list[Row], path: str | os.PathLike, extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rows": [asdict(r) for r in rows], "cpu": cpu_info(), **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
