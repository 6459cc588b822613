"""The Pareto plot of a compress result: metric vs latency at the largest batch, and metric vs size, as one
inline PNG (matplotlib's Agg backend, imported only when a report is drawn)."""
from __future__ import annotations

import base64
import io
import statistics

TRIED, PARETO, BASELINE, CHOSEN, PEER, BOUND = "#9e9e9e", "#1f77b4", "#000000", "#d62728", "#2ca02c", "#ff7f0e"


def largest_batch(result: dict) -> str | None:
    """The largest batch size of the goal (a latency key, as a string), else the largest one any candidate has."""
    batches = [int(b) for b in (result.get("goal") or {}).get("batch") or []]
    if not batches:
        batches = [int(b) for c in _all(result) for b in (c.get("latency_ms") or {})]
    return str(max(batches)) if batches else None


def drop_scale(result: dict) -> float:
    """How many drop units one metric unit is: 100 when drops are in percentage points of a metric kept as a
    fraction (top1 0.93, drop 0.32 points), else 1; read off the candidates whose drop and metric are both known."""
    base = (result.get("baseline") or {}).get("metric")
    sign = 1 if (result.get("goal") or {}).get("higher_is_better", True) else -1
    ratios = [c["drop"] / (sign * (base - c["metric"])) for c in result.get("candidates") or []
              if base is not None and c.get("metric") is not None and c.get("drop") is not None
              and abs(base - c["metric"]) > 1e-9 and c["drop"] != 0]
    return 100.0 if ratios and statistics.median(ratios) > 10 else 1.0


def bound(result: dict) -> float | None:
    """The metric the bound allows at worst: baseline - max_drop (higher is better) or + max_drop."""
    goal, base = result.get("goal") or {}, (result.get("baseline") or {}).get("metric")
    if base is None or goal.get("max_drop") is None:
        return None
    sign = 1 if goal.get("higher_is_better", True) else -1
    return base - sign * goal["max_drop"] / drop_scale(result)


def pareto_png(result: dict) -> str | None:
    """The two panels as base64 PNG text, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batch = largest_batch(result)
    metric = (result.get("goal") or {}).get("metric") or "metric"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=100)
    try:
        _panel(axes[0], result, lambda c: (c.get("latency_ms") or {}).get(batch), f"latency at batch {batch} (ms)")
        _panel(axes[1], result, lambda c: c.get("size_bytes"), "ONNX size (bytes)")
        axes[0].set_ylabel(metric)
        axes[0].legend(loc="best", fontsize=8, framealpha=0.8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _all(result: dict) -> list[dict]:
    return [c for c in [result.get("baseline")] + list(result.get("candidates") or []) if c]


def _panel(ax, result: dict, x_of, xlabel: str) -> None:
    """One panel: tried candidates as dots, the Pareto ones highlighted and joined by a step line, the
    baseline, the chosen one as a star, peers as labelled diamonds, the bound as a dashed line."""
    def point(c):
        x, y = x_of(c), c.get("metric")
        return (x, y) if x is not None and y is not None else None

    tried = [(point(c), c) for c in result.get("candidates") or [] if point(c)]
    others = [p for p, c in tried if not c.get("pareto")]
    front = sorted(p for p, c in tried if c.get("pareto"))
    xs = [p[0] for p, _ in tried]
    if others:
        ax.scatter(*zip(*others), s=22, color=TRIED, label="tried", zorder=2)
    if front:
        ax.step(*zip(*front), where="post", color=PARETO, linewidth=1.2, zorder=3)
        ax.scatter(*zip(*front), s=38, color=PARETO, label="Pareto", zorder=4)
    base = point(result.get("baseline") or {})
    if base:
        xs.append(base[0])
        ax.scatter(*base, s=70, marker="s", color=BASELINE, label="baseline (float)", zorder=5)
    pick = result.get("chosen") or result.get("closest")
    for p, c in tried:
        if c.get("id") == pick:
            ax.scatter(*p, s=260, marker="*", color=CHOSEN, label="chosen" if result.get("chosen") else "closest",
                       zorder=6)
    for peer in result.get("peers") or []:
        p = point(peer)
        if p:
            xs.append(p[0])
            ax.scatter(*p, s=60, marker="D", color=PEER, zorder=5)
            ax.annotate(str(peer.get("name", "")), p, textcoords="offset points", xytext=(6, 4), fontsize=8,
                        color=PEER)
    line = bound(result)
    if line is not None:
        ax.axhline(line, linestyle="--", color=BOUND, linewidth=1, label="bound", zorder=1)
    positive = [x for x in xs if x and x > 0]
    if positive and max(positive) / min(positive) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
