"""bench_interleaved: runners timed in alternating blocks, warm-up calls untimed, the stopping rules, and
medians that keep the true ratio of two runners whose cost is known."""
import time

import pytest

from smallify.measure.latency import LatencyStats, bench_interleaved


def _sleeper(seconds, calls, name):
    def run(feed):
        calls.append((name, feed["x"]))
        time.sleep(seconds)
    return run


def test_blocks_alternate_and_the_ratio_holds():
    calls = []
    runners = {"fast": _sleeper(0.002, calls, "fast"), "slow": _sleeper(0.004, calls, "slow")}
    stats = bench_interleaved(runners, {"fast": {"x": 1}, "slow": {"x": 2}}, warmup=2, min_runs=5,
                              budget_s=0.3, block_s=0.03)
    assert set(stats) == {"fast", "slow"} and all(isinstance(s, LatencyStats) for s in stats.values())
    assert all(feed == (1 if name == "fast" else 2) for name, feed in calls)   # each runner gets its own feed
    blocks = [calls[0][0]]
    for name, _ in calls[1:]:
        if name != blocks[-1]:
            blocks.append(name)
    assert len(blocks) >= 4 and blocks == ["fast", "slow"] * (len(blocks) // 2)   # A B A B ..., not A A B B
    # every block starts with `warmup` untimed calls
    assert len(calls) == sum(s.runs for s in stats.values()) + 2 * len(blocks)
    assert stats["fast"].runs >= 5 and stats["slow"].runs >= 5
    ratio = stats["slow"].median_ms / stats["fast"].median_ms
    assert 1.5 < ratio < 2.5, ratio                     # 4 ms against 2 ms of sleep (plus overhead)
    assert stats["fast"].median_ms == pytest.approx(2.0, abs=1.5) and stats["fast"].p90_ms >= stats["fast"].median_ms


def test_stops_at_max_runs_and_waits_for_min_runs():
    calls = []
    stats = bench_interleaved({"a": _sleeper(0.0, calls, "a")}, {"a": {"x": 0}}, warmup=0, max_runs=7,
                              budget_s=60.0, block_s=10.0)
    assert stats["a"].runs == 7 and len(calls) == 7       # the cap ends the run long before the budget
    calls.clear()
    stats = bench_interleaved({"a": _sleeper(0.001, calls, "a")}, {"a": {"x": 0}}, warmup=1, min_runs=12,
                              budget_s=0.0, block_s=0.0)
    assert stats["a"].runs == 12                          # budget spent at once: still min_runs timed calls
    assert len(calls) == 12 + 12                          # block_s=0: one timed call per block, each warmed up once


def test_latency_stats_of_seconds():
    s = LatencyStats.of([0.001, 0.002, 0.003, 0.010])
    assert (s.median_ms, s.runs) == (pytest.approx(2.5), 4) and s.p90_ms == pytest.approx(7.9)
