"""Side-by-side tables of size and latency, shared by ``smallify bench``, the demo and the benchmarks."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from smallify import onnx_io
from smallify.measure.latency import bench_interleaved, openvino_runner, ort_runner, random_feed
from smallify.measure.size import file_size, format_bytes


@dataclass
class Row:
    name: str
    size_bytes: int | None = None
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)   # batch -> {median, p90}
    metrics: dict[str, float] = field(default_factory=dict)                 # e.g. top1


RUNTIMES = ("onnxruntime", "openvino")


def bench_onnx_files(paths: list[str], batches: list[int], threads: int = 2, budget_s: float = 10.0,
                     runtimes: tuple[str, ...] = ("onnxruntime",)) -> list[Row]:
    """Every model in every runtime, all timed in one interleaved loop per batch size."""
    from smallify.errors import ConfigError

    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or not runtimes:
        raise ConfigError(f"runtime {bad or runtimes!r} is not supported; accepted: {', '.join(RUNTIMES)}")
    for p in paths:
        onnx_io.load(p)  # clear errors for missing / corrupt files
    runners, rows, inputs = {}, {}, None
    for p in paths:
        for rt in runtimes:
            key = f"{os.path.basename(p)} [{rt}]" if len(runtimes) > 1 else os.path.basename(p)
            if rt == "onnxruntime":
                run, ins = ort_runner(p, threads)
                inputs = inputs or ins
            else:
                run = openvino_runner(p, threads)
            runners[key] = run
            rows[key] = Row(key, file_size(p))
    if inputs is None:
        inputs = ort_runner(paths[0], threads)[1]
    for b in batches:
        feed = random_feed(inputs, b)
        stats = bench_interleaved(runners, {k: feed for k in runners}, budget_s=budget_s)
        for k, s in stats.items():
            rows[k].latency_ms[b] = {"median": s.median_ms, "p90": s.p90_ms}
    return list(rows.values())


def wide_console() -> Console:
    """A console that does not squeeze tables when stdout is a file or a pipe (CI logs, README figures)."""
    return Console() if sys.stdout.isatty() else Console(width=220)


def print_table(rows: list[Row], title: str, console: Console | None = None) -> None:
    console = console or wide_console()
    base = rows[0]
    batches = sorted({b for r in rows for b in r.latency_ms})
    metric_names = [m for m in dict.fromkeys(k for r in rows for k in r.metrics)]
    t = Table(title=title)
    t.add_column("model")
    for m in metric_names:
        t.add_column(m, justify="right")
    t.add_column("size", justify="right")
    t.add_column("× size", justify="right")
    for b in batches:
        t.add_column(f"b{b} median ms", justify="right")
        t.add_column(f"b{b} p90", justify="right")
        t.add_column(f"× b{b}", justify="right")
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
    doc = {"rows": [asdict(r) for r in rows], **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
