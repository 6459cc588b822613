"""``compress``: one search across the families under the user's accuracy bound, latency measured on the target
runtime in the loop.

    float model ──► baseline: exported, scored, timed
        │
        ├─ quick candidates (quantizers alone, k-means + INT8): built (worker processes), scored, timed
        ├─ structural candidates (pruning ratios, residual branches, low-rank budgets) + INT8, not fine-tuned:
        │     built, scored, timed; their latency and MACs are the proxy that picks which are worth training
        ├─ the most promising (faster / smaller than the best candidate meeting the bound) fine-tuned by
        │     distillation from the float model, then INT8 (objective size: also k-means before INT8)
        └─ Pareto front (drop, objective, size); front and baseline timed again, each model in its own process,
              alternating; the best candidate within the bound chosen; its recipe replayed step by step

Every finished candidate is kept in ``out/candidates/<id>/record.json`` beside its files, so that a killed
search resumes where it stopped (a distillation in progress resumes from its checkpoint)."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from smallify.errors import ConfigError, DataError, ModelError
from smallify.tune.build import Context, build_job, read_record, write_record
from smallify.tune.goal import Goal
from smallify.tune.recipe import Recipe

RESULT_KIND = "smallify-compress-result"
RESULT_VERSION = 1


class BudgetError(ConfigError):
    """The time budget cannot pay for one candidate."""


class CompressResult:
    """What ``compress`` returns: ``result`` (the JSON record, see DESIGN of result.json in html/report.py),
    ``out`` (the folder), ``chosen`` (the chosen or closest candidate's record, or None), ``bound_met``."""

    def __init__(self, result: dict, out: Path):
        self.result, self.out = result, out

    @property
    def report(self) -> CompressResult:
        return self

    @property
    def bound_met(self) -> bool:
        return bool(self.result["bound_met"])

    @property
    def chosen(self) -> dict | None:
        cid = self.result.get("chosen") or self.result.get("closest")
        return next((c for c in self.result["candidates"] if c["id"] == cid), None)

    def to_dict(self) -> dict:
        return self.result

    def __str__(self) -> str:
        r, goal = self.result, self.result["goal"]
        lines = [r["verdict"], (f"{len(r['candidates'])} candidate(s) in {r['search_seconds'] / 60:.1f} min; "
                 f"objective {goal['objective']} on {goal['runtime']}, bound: drop <= {goal['max_drop']:g}")]
        base = r["baseline"]
        for c in sorted(r["candidates"], key=lambda c: (c["status"] != "done", c.get("objective") or 9e9)):
            lat = ", ".join(f"b{b} {v:.2f} ms" for b, v in c["latency_ms"].items())
            metric = "" if c["metric"] is None else f"{goal['metric']} {c['metric']:.4f} (drop {c['drop']:+.3f})"
            mark = "*" if c["id"] == (r["chosen"] or r["closest"]) else ("p" if c.get("pareto") else " ")
            lines.append(f" {mark} {c['name'][:60]:60s} {c['status']:6s} {metric} {lat} "
                         f"{(c['size_bytes'] or 0) / max(base['size_bytes'], 1):.3f}x size"
                         + (f"  [{c['reason']}]" if c.get("reason") else ""))
        return "\n".join(lines)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _context(model, data, train_data, goal: Goal, cache: Path) -> Context:
    import numpy as np
    import torch
    from torch import nn

    if isinstance(model, nn.Module):
        calib = data
        if isinstance(calib, np.ndarray):
            calib = torch.from_numpy(calib)
        elif isinstance(calib, (tuple, list)) and calib and all(isinstance(t, (np.ndarray, torch.Tensor)) for t in calib):
            calib = tuple(torch.as_tensor(t) for t in calib)
        if not (isinstance(calib, (torch.Tensor, tuple))) or len(calib) == 0:
            raise DataError(f"compress needs calibration data for a PyTorch model: a tensor or array (samples on "
                            f"axis 0) or a tuple of them, one per input; got {type(data).__name__}")
        example = tuple(t[:2] for t in calib) if isinstance(calib, tuple) else calib[:2]
        return Context("torch", model.eval(), calib, example, goal.metric, goal.higher_is_better, None, str(cache),
                       train_data)
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
        from smallify.data import load_npz
        from smallify.onnx import io as onnx_io

        proto = onnx_io.load(model)
        inits = {i.name for i in proto.graph.initializer}
        names = [i.name for i in proto.graph.input if i.name not in inits]
        if isinstance(data, (str, os.PathLike)):
            data = load_npz(data)
        if isinstance(data, (np.ndarray, torch.Tensor)) and len(names) == 1:
            data = {names[0]: np.asarray(data)}
        if not isinstance(data, dict) or not data:
            raise DataError(f"compress needs calibration data for an ONNX model: a dict {{input name: array}}, a .npz "
                            f"path, or one array for a one-input model; inputs: {', '.join(names)}")
        if train_data is not None:
            raise ConfigError("train_data applies to PyTorch models; an ONNX model is only quantized")
        return Context("onnx", str(model), data, None, goal.metric, goal.higher_is_better, None, str(cache))
    raise ModelError(f"cannot compress a {type(model).__name__}; accepted: torch.nn.Module or the path of an .onnx file")


class _Search:
    def __init__(self, ctx: Context, goal: Goal, out: Path, progress: bool, ray_address: str | None):
        self.ctx, self.goal, self.out, self.progress, self.ray = ctx, goal, out, progress, ray_address
        self.start = time.monotonic()
        self.records: dict[str, dict] = {}       # id -> record, in the order tried
        self.base: dict | None = None

    # ---- time ----
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return math.inf if self.goal.budget_minutes is None else self.goal.budget_minutes * 60 - self.elapsed()

    # ---- building ----
    def folder(self, recipe: Recipe) -> Path:
        return self.out / "candidates" / ("baseline" if not recipe.steps else recipe.key())

    def build_all(self, recipes: list[Recipe], stage: str) -> list[dict]:
        """Build the recipes not built before (kept records are reused), at most ``workers`` at a time."""
        todo, done = [], []
        for r in recipes:
            rec = read_record(self.folder(r))
            if rec is not None and rec.get("status") in ("done", "failed"):
                done.append(rec)
            else:
                todo.append(r)
        if done:
            _log(self.progress, f"{stage}: {len(done)} candidate(s) kept from an earlier run")
        per = [self._estimate()]
        if self.left() < per[0]:
            return done + [self._skipped(r, "time budget spent before it was built") for r in todo]
        finished = []
        for i, rec in enumerate(self._run(todo)):
            finished.append(rec)
            per.append(rec["seconds"])
            eta = (len(todo) - i - 1) * (sum(per) / len(per)) / max(1, self.goal.workers)
            metric = "failed: " + rec["reason"] if rec["status"] == "failed" else \
                f"{self.goal.metric_name} {rec['metric']:.4f} (drop {rec['drop']:+.3f})"
            _log(self.progress, f"{stage} [{i + 1}/{len(todo)}] {rec['name']}: {metric}, {rec['seconds']:.0f} s; "
                                f"ETA {eta / 60:.1f} min")
        return done + finished

    def _estimate(self) -> float:
        return self.base["seconds"] if self.base else 0.0

    def _skipped(self, recipe: Recipe, reason: str) -> dict:
        return {"id": recipe.key(), "name": recipe.name, "recipe": recipe.to_dict(), "status": "pruned",
                "reason": reason, "metric": None, "drop": None, "latency_ms": {}, "size_bytes": None,
                "container_bytes": None, "macs": None, "params": None, "layers": [], "seconds": 0.0}

    def _run(self, recipes: list[Recipe]):
        jobs = [(self.ctx, r, self.folder(r), self.progress and self.goal.workers == 1) for r in recipes]
        if self.ray:
            yield from _ray_map(self.ray, jobs)
            return
        if self.goal.workers == 1 or len(jobs) < 2:
            for job in jobs:
                if self.left() <= 0:
                    yield self._skipped(job[1], "time budget spent before it was built")
                    continue
                yield build_job(job)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        self.ctx.threads = max(1, self.goal.threads // self.goal.workers)
        with ProcessPoolExecutor(self.goal.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(build_job, job) for job in jobs]
            for f in as_completed(futures):
                yield f.result()
        self.ctx.threads = None

    # ---- timing ----
    def time(self, records: list[dict], rounds: int = 1, keep: tuple[dict, ...] = ()) -> None:
        """Time the done records and the baseline on the goal's runtime, each model in its own process, models
        alternating; latency_ms of each record is set (and kept on disk). ``keep``: records timed alongside as
        references whose figures stay as they were."""
        from smallify.measure.isolated import bench_isolated

        if not records and self.base["latency_ms"]:
            return
        todo = {r["id"]: r for r in [self.base, *keep, *records] if r["status"] == "done"}
        paths = {k: str(self.folder_of(r) / "model.onnx") for k, r in todo.items()}
        _log(self.progress, f"timing {len(paths)} model(s) on {self.goal.runtime}, batch "
                            f"{', '.join(map(str, self.goal.batch))}, {rounds} round(s)")
        t = bench_isolated(paths, self.goal.batch, self.goal.runtime, self.goal.threads, self.goal.timing_seconds,
                           rounds)
        fixed = {r["id"] for r in keep} | ({"baseline"} if keep and self.base["latency_ms"] else set())
        for k, r in todo.items():
            if k not in fixed:
                r["latency_ms"] = {str(b): round(t[k, b], 4) for b in self.goal.batch}
                write_record(self.folder_of(r), r)

    def folder_of(self, record: dict) -> Path:
        return self.out / "candidates" / record["id"]

    # ---- scoring ----
    def objective(self, r: dict) -> float | None:
        base = self.base
        if r["status"] != "done":
            return None
        if self.goal.objective == "size":
            return _smallest(r) / _smallest(base)
        if not r["latency_ms"] or not base["latency_ms"]:
            return None
        ratios = [r["latency_ms"][b] / base["latency_ms"][b] for b in base["latency_ms"] if b in r["latency_ms"]]
        return math.exp(sum(map(math.log, ratios)) / len(ratios))

    def meets(self, r: dict) -> bool:
        return r["status"] == "done" and r["drop"] is not None and r["drop"] <= self.goal.max_drop + 1e-12

    def best_valid(self) -> float:
        values = [self.objective(r) for r in self.records.values() if self.meets(r)]
        return min([v for v in values if v is not None] + [1.0])

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.records[r["id"]] = r


def _smallest(r: dict) -> int:
    return min(b for b in (r["size_bytes"], r.get("container_bytes")) if b)


def _ray_map(address: str, jobs: list):
    """Build ``jobs`` on the Ray cluster at ``address`` ('local': a local instance with 2 CPUs, stopped after);
    the out folder must be one every node sees (a shared file system)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs the optional package ray (pip install 'smallify[ray]'); or leave --ray out "
                          "to use local worker processes") from None
    local = address == "local"
    started = not ray.is_initialized()
    if started:
        options = dict(num_cpus=2, include_dashboard=False) if local else dict(address=address)
        ray.init(log_to_driver=False, **options)
    try:
        remote = ray.remote(num_cpus=1)(build_job)
        pending = [remote.remote(job) for job in jobs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started and local:
            ray.shutdown()
