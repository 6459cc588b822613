"""``smallify.compress`` and ``smallify.tune.replay``: the search's stages in order (see search.py), the choice,
the files it writes and the result document (result.json; its schema is described in html/report.py)."""
from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

from smallify.config import check_config
from smallify.errors import ConfigError, DataError, SmallifyError
from smallify.tune import space
from smallify.tune.build import build
from smallify.tune.goal import Goal
from smallify.tune.pareto import pareto_front
from smallify.tune.recipe import Recipe, recipe_from_dict
from smallify.tune.search import (
    RESULT_KIND,
    RESULT_VERSION,
    BudgetError,
    CompressResult,
    _context,
    _log,
    _Search,
    _smallest,
)


def compress(model, goal: Goal, data, train_data=None, out: str | os.PathLike = "out/compress",
             progress: bool = True, peers: list[dict] | None = None, command: str | None = None,
             ray_address: str | None = None) -> CompressResult:
    """Search across the families for the best model within ``goal.max_drop`` of the float model's metric.

    ``model``: a ``torch.nn.Module`` (every family) or the path of an ``.onnx`` file (quantization). ``data``:
    calibration inputs (PyTorch: a tensor/array with samples on axis 0, or a tuple of them; ONNX: {input name:
    array} or a .npz path). ``train_data``: a ``smallify.TrainData``; with it, pruned and decomposed candidates
    are recovered by distillation. ``out``: the folder of everything written (candidates/, best.onnx,
    best.smallify, recipe.json, result.json, report.html; when no candidate meets the bound, closest.* instead
    and ``result.bound_met`` is False). ``peers``: points of other tools to show beside ours in the report.
    ``ray_address``: build candidates on a Ray cluster (optional package ``ray``).
    """
    goal = check_config(goal, Goal, "compress", "goal")
    if goal is None or goal.metric is None:
        raise ConfigError("compress needs Goal(metric=...): a function metric(onnx_path) -> float, higher is better "
                          "(or Goal(higher_is_better=False))")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder for the search's files")
    fresh = not out.exists()
    ctx = _context(model, data, train_data, goal, out / "cache")
    search = _Search(ctx, goal, out, progress, ray_address)
    try:
        (out / "candidates").mkdir(parents=True, exist_ok=True)
        _baseline(search)
    except BaseException:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)   # nothing half-written
        raise
    _stages(search, train_data is not None)
    result = _finish(search, peers or [], command)
    return CompressResult(result, out)


def _baseline(search: _Search) -> None:
    from smallify.train import check_metric

    rec = build(search.ctx, Recipe(seed=search.goal.seed), search.folder(Recipe()), False)
    if rec["status"] != "done":
        raise DataError(f"the float model could not be scored: {rec['reason']}")
    search.ctx.base_metric = check_metric(rec["metric"])
    rec["id"], rec["drop"] = "baseline", 0.0
    search.base = rec
    search.time([])
    _log(search.progress, f"float model: {search.goal.metric_name} {rec['metric']:.4f}, "
                          + ", ".join(f"b{b} {v:.2f} ms" for b, v in rec["latency_ms"].items())
                          + f", {rec['size_bytes']:,} bytes ({search.elapsed():.0f} s)")
    if search.left() < search.elapsed():
        raise BudgetError(f"budget_minutes={search.goal.budget_minutes:g} is too small for one candidate: the float "
                          f"model alone took {search.elapsed():.0f} s to export, score and time; give at least "
                          f"{max(1, round(3 * search.elapsed() / 60))} minutes")


def _stages(search: _Search, can_train: bool) -> None:
    goal, kind = search.goal, search.ctx.kind
    quick = search.build_all(space.quick(goal, kind), "quick")
    search.time(quick)
    search.add(quick)
    if kind != "torch":
        return
    shapes = search.build_all(space.structural(goal), "structural")
    search.time(shapes)
    search.add(shapes)
    _finetune(search, shapes, can_train)
    if goal.objective == "size" and "cluster" in goal.families:
        best = sorted((r for r in search.records.values() if search.meets(r)
                       and not any(s["verb"] == "cluster" for s in r["recipe"]["steps"])), key=search.objective)[:2]
        shared = search.build_all([space.shared_after(recipe_from_dict(r["recipe"]), goal) for r in best], "k-means")
        search.time(shared)
        search.add(shared)


def _finetune(search: _Search, shapes: list[dict], can_train: bool) -> None:
    """Fine-tune the structural candidates that could beat the best candidate within the bound, fastest (or
    smallest) first, ``workers`` at a time. Their untuned latency and metric are the proxy: after each round,
    a candidate no better than the new best within the bound is dropped, and after a tuned candidate missed
    the bound, so is every more aggressive one whose untuned metric was no better than its."""
    goal = search.goal
    queue = sorted((r for r in shapes if r["status"] == "done" and not search.meets(r)
                    and (search.objective(r) or 9) < search.best_valid()), key=search.objective)
    tuned = 0
    while queue and tuned < goal.finetune and can_train and search.left() > 0:
        n = min(goal.workers, goal.finetune - tuned)
        batch, queue = queue[:n], queue[n:]
        recipes = [space.finetuned(recipe_from_dict(r["recipe"]), goal) for r in batch]
        records = search.build_all(recipes, "fine-tuned")
        by_id = {r["id"]: r for r in records}
        search.time(records)
        search.add(records)
        tuned += len(batch)
        bar = search.best_valid()
        for untuned, recipe in zip(batch, recipes):
            if not search.meets(by_id[recipe.key()]):
                queue = [q for q in queue if q["metric"] > untuned["metric"] or search.objective(q) > search.objective(untuned)]
        queue = [q for q in queue if search.objective(q) < bar]
    for r in queue:
        r["reason"] = ("not fine-tuned: no train_data" if not can_train else
                       "not fine-tuned: the time budget or Goal.finetune was spent")


def _finish(search: _Search, peers: list[dict], command: str | None) -> dict:
    goal, base = search.goal, search.base
    front = _front(search)
    valid = [r for r in search.records.values() if r["id"] in front and search.meets(r)]
    final = sorted(valid, key=search.objective)[:6] or [r for r in search.records.values() if r["id"] in front][:6]
    if final:
        search.time(final, rounds=3)          # the figures reported: each alone, alternating, 3 rounds
    valid = sorted((r for r in search.records.values() if search.meets(r) and search.objective(r) is not None),
                   key=search.objective)
    chosen = valid[0] if valid else None
    closest = None
    if chosen is None:
        tried = [r for r in search.records.values() if r["status"] == "done" and r["drop"] is not None]
        closest = min(tried, key=lambda r: (r["drop"], search.objective(r) or 9e9)) if tried else None
    pick = chosen or closest
    steps = _replay_steps(search, pick) if pick else []
    front = _front(search)
    for r in search.records.values():
        r["objective"], r["meets_bound"], r["pareto"] = search.objective(r), search.meets(r), r["id"] in front
    base["objective"], base["meets_bound"], base["pareto"] = 1.0, True, False
    speedup = chosen is not None and chosen["objective"] < 0.97
    result = {
        "kind": RESULT_KIND, "schema_version": RESULT_VERSION, "smallify_version": _version(),
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command or f"smallify.compress(model, Goal(**{json.dumps(goal.to_dict())}), data, out={str(search.out)!r})",
        "machine": _machine(), "goal": {**goal.to_dict(), "metric": goal.metric_name, "batch": list(goal.batch)},
        "baseline": base, "candidates": list(search.records.values()),
        "chosen": chosen["id"] if chosen else None, "closest": closest["id"] if closest else None,
        "bound_met": chosen is not None, "speedup": speedup, "verdict": _verdict(search, chosen, closest, speedup),
        "chosen_steps": steps, "peers": peers, "search_seconds": round(search.elapsed(), 1), "files": {},
    }
    _write(search, result, pick, "best" if chosen else "closest")
    return result


def _front(search: _Search) -> set[str]:
    """Ids on the Pareto front of (drop, objective, smallest file) among the scored candidates and the float model."""
    done = [r for r in search.records.values() if r["status"] == "done" and search.objective(r) is not None]
    points = {r["id"]: (r["drop"], search.objective(r), _smallest(r)) for r in done}
    points["baseline"] = (0.0, 1.0, _smallest(search.base))
    return set(pareto_front(points)) - {"baseline"}


def _verdict(search: _Search, chosen, closest, speedup: bool) -> str:
    goal, base = search.goal, search.base
    what = "latency" if goal.objective == "latency" else "size"
    if chosen is None:
        if closest is None:
            return f"bound not met; no candidate could be scored (max drop {goal.max_drop:g})"
        return (f"bound not met; closest candidate: {closest['name']} loses {closest['drop']:.4g} "
                f"{goal.metric_name} (max drop {goal.max_drop:g}) at {closest['objective']:.2f}x {what}")
    text = (f"chosen {chosen['name']}: {chosen['objective']:.2f}x {what} of the float model on {goal.runtime}, "
            f"{_smallest(chosen) / _smallest(base):.2f}x size, {goal.metric_name} drop {chosen['drop'] + 0.0:.4g} "
            f"(max {goal.max_drop:g})")
    if not speedup:
        text = (f"no speed-up on this runtime: no candidate within the bound is faster than the float model "
                f"on {goal.runtime}; best: " if what == "latency" else
                "no candidate within the bound is smaller than the float model; best: ") + text
    return text


def _replay_steps(search: _Search, pick: dict) -> list[dict]:
    """The chosen recipe step by step: each prefix built (distilled prefixes come from the cache), scored and
    timed beside the float model."""
    recipe = recipe_from_dict(pick["recipe"])
    prefixes = [Recipe(recipe.steps[:n], recipe.seed) for n in range(1, len(recipe.steps))]
    built = {r["id"]: r for r in (search.build_all(prefixes, "step by step") if prefixes else [])}
    records = [search.records.get(p.key()) or built[p.key()] for p in prefixes]
    search.time(records, rounds=2, keep=(pick,))     # the pick and the float model keep their final figures
    rows = [{"step": "float", "label": "float", **_figures(search.base)}]
    for p, r in zip(prefixes + [recipe], records + [pick]):
        rows.append({"step": p.steps[-1].verb, "label": p.steps[-1].label, **_figures(r)})
    return rows


def _figures(r: dict) -> dict:
    return {k: r.get(k) for k in ("metric", "drop", "latency_ms", "size_bytes", "container_bytes", "status", "reason")}


def _write(search: _Search, result: dict, pick: dict | None, stem: str) -> None:
    from smallify.files import write_all

    out = search.out
    writers = {}
    if pick:
        folder = search.folder_of(pick)
        writers[out / f"{stem}.onnx"] = lambda tmp, f=folder: shutil.copyfile(f / "model.onnx", tmp)
        if (folder / "model.smallify").exists():
            writers[out / f"{stem}.smallify"] = lambda tmp, f=folder: shutil.copyfile(f / "model.smallify", tmp)
        recipe = json.dumps(pick["recipe"], indent=2)
        writers[out / ("recipe.json" if stem == "best" else "closest.recipe.json")] = \
            lambda tmp: Path(tmp).write_text(recipe)
    result["files"] = {p.name.split(".", 1)[1].replace("recipe.json", "recipe"): p.name for p in writers}
    result["files"].update(result="result.json", report="report.html")
    text = json.dumps(result, indent=1)
    writers[out / "result.json"] = lambda tmp: Path(tmp).write_text(text)
    write_all(writers)
    try:
        from smallify.html.report import write_report

        write_report(result, out / "report.html")
    except ImportError:        # pragma: no cover (the HTML report is part of the package)
        pass


def _version() -> str:
    from smallify import __version__

    return __version__


def _machine() -> dict:
    import platform

    from smallify.measure.machine import cpu_summary

    versions = {"python": platform.python_version(), "smallify": _version()}
    for name in ("torch", "onnx", "onnxruntime", "openvino"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    return {"cpu": cpu_summary(), "versions": versions}


def replay(model, recipe: Recipe | str | os.PathLike, data, train_data=None, metric=None,
           out: str | os.PathLike = "out/replay", progress: bool = True) -> dict:
    """Run ``recipe`` (a Recipe, or a recipe.json / result.json path) on ``model`` exactly as the search did;
    writes ``out``/model.onnx (and model.smallify) and returns the record (metric when ``metric`` is given)."""
    from smallify.tune.recipe import load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    goal = Goal(metric=metric or (lambda path: 0.0))
    out = Path(out)
    fresh = not out.exists()
    ctx = _context(model, data, train_data, goal, out / "cache")
    rec = build(ctx, recipe, out, progress)
    if rec["status"] != "done":
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise SmallifyError(f"recipe {recipe.name} failed: {rec['reason']}")
    if metric is None:
        rec["metric"] = None
    return rec
