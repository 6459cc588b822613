"""One candidate built and scored: its recipe's steps run on the float model (each the existing verb), the
result exported to ONNX (and saved as .smallify for PyTorch models), scored with the user's metric on the ONNX
file, its MACs, parameters, bytes and per-layer choices recorded. Timing is not done here (the search times
candidates alone, never beside a build). Runs in the search's process or in a worker process."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from smallify.errors import SmallifyError, first_line
from smallify.tune.recipe import Recipe, Step


@dataclasses.dataclass
class Context:
    """What every build needs, picklable for worker processes. ``kind`` 'torch' | 'onnx'; ``calib``: for PyTorch
    a tensor or a tuple of tensors (samples on axis 0), for ONNX a dict {input name: array}; ``example``: a batch
    to trace and export with; ``metric(onnx_path) -> float``; ``cache``: folder of distilled intermediate models
    (reused by every recipe that starts with the same steps)."""

    kind: str
    model: object                   # nn.Module (float) or path of the float .onnx
    calib: object
    example: object
    metric: Callable
    higher_is_better: bool
    base_metric: float | None
    cache: str
    train_data: object = None
    threads: int | None = None


def layer_choices(verb: str, report) -> list[dict]:
    """Per-layer choices of one step's report, as {'step', 'layer', 'choice'} rows."""
    rows = []
    if report is None:
        return rows
    if verb == "prune":
        for b in getattr(report, "branches", []):
            rows.append({"layer": ", ".join(b["layers"]), "choice": f"branch {b['branch']} removed"})
        for g in getattr(report, "groups", []):
            if g.get("after") is not None and g["after"] < g["before"]:
                rows.append({"layer": ", ".join(g["producers"]), "choice": f"{g['before']} -> {g['after']} channels"})
    elif verb in ("decompose", "cluster"):
        for l in getattr(report, "layers", []):
            if l.status == "decomposed":
                choice = f"{l.method} ranks {list(l.ranks)} of {l.full_rank}"
            elif l.status == "shared":
                choice = f"{l.values} values x {l.codebooks} codebook(s), SQNR {l.sqnr_db:.1f} dB"
            else:
                choice = f"kept: {l.reason}"
            rows.append({"layer": l.name, "choice": choice})
    elif verb == "quantize":
        plan = getattr(getattr(report, "plan", None), "plan", None) or {}
        for l in getattr(report, "layers", []):
            bits = plan.get(l.name)
            choice = (f"int{bits}" if isinstance(bits, int) else "quantized") if l.status == "quantized" \
                else f"float: {l.reason}"
            rows.append({"layer": l.name, "choice": choice})
    return [{"step": verb, **r} for r in rows]


def _apply_torch(model, s: Step, ctx: Context, folder: Path, index: int, progress: bool):
    import smallify as sm

    data = _batches(ctx.calib)
    if s.verb == "prune":
        return sm.prune(model, s.config, ctx.example, data=data)
    if s.verb == "decompose":
        return sm.decompose(model, s.config, data=data, progress=False)
    if s.verb == "cluster":
        return sm.cluster(model, s.config, data=data, progress=False)
    if s.verb == "distill":
        if ctx.train_data is None:
            raise SmallifyError("a distill step needs training data: pass train_data= (smallify.TrainData)")
        student = copy.deepcopy(model)
        return sm.distill(student, ctx.model, ctx.train_data, s.config, train_config=s.train,
                          checkpoint=folder / f"distill{index}.ckpt", progress=progress)
    if s.verb == "quantize":
        eval_fn = None
        if isinstance(s.config, sm.MixedPrecision):
            eval_fn = _module_metric(ctx, folder)
        return sm.quantize(model, s.config, data=data, eval_fn=eval_fn, progress=False)
    raise SmallifyError(f"step {s.verb!r} does not apply to a PyTorch model")


def _batches(calib, size: int = 64) -> list:
    """Calibration batches of at most ``size`` samples from a tensor or a tuple of tensors."""
    if isinstance(calib, (tuple, list)):
        n = len(calib[0])
        return [tuple(t[i:i + size] for t in calib) for i in range(0, n, size)]
    return [calib[i:i + size] for i in range(0, len(calib), size)]


def _module_metric(ctx: Context, folder: Path) -> Callable:
    """MixedPrecision's per-trial metric on a PyTorch module: exported to ONNX, scored like every candidate."""
    from smallify.export.onnx import export_onnx

    def metric(module) -> float:
        path = folder / "trial.onnx"
        export_onnx(module, path, ctx.example)
        try:
            return ctx.metric(str(path))
        finally:
            path.unlink(missing_ok=True)
    return metric


def _cached(ctx: Context, recipe: Recipe):
    """The longest prefix of ``recipe`` ending with a distill step that a previous build kept: (steps done,
    model, their layer rows), or (0, None, [])."""
    import smallify as sm

    for n in range(len(recipe.steps), 0, -1):
        if recipe.steps[n - 1].verb != "distill":
            continue
        key = Recipe(recipe.steps[:n], recipe.seed).key()
        path, rows = Path(ctx.cache) / f"{key}.smallify", Path(ctx.cache) / f"{key}.json"
        if path.exists() and rows.exists():
            try:
                return n, sm.load(path, copy.deepcopy(ctx.model)), json.loads(rows.read_text())
            except (SmallifyError, ValueError):
                continue
    return 0, None, []


def _keep(ctx: Context, recipe: Recipe, n: int, model, rows: list) -> None:
    import smallify as sm
    from smallify.files import write_atomic

    key = Recipe(recipe.steps[:n], recipe.seed).key()
    Path(ctx.cache).mkdir(parents=True, exist_ok=True)
    sm.save(model, Path(ctx.cache) / f"{key}.smallify")
    write_atomic(Path(ctx.cache) / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(rows)))


def build(ctx: Context, recipe: Recipe, folder: str | os.PathLike, progress: bool = False) -> dict:
    """Build ``recipe`` into ``folder`` (model.onnx, model.smallify, record.json) and return its record
    (without latency). Errors of a step or of the metric make a record with status 'failed' and the reason."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    start = time.perf_counter()
    record = {"id": recipe.key(), "name": recipe.name, "recipe": recipe.to_dict(), "status": "done", "reason": None,
              "metric": None, "drop": None, "latency_ms": {}, "size_bytes": None, "container_bytes": None,
              "macs": None, "params": None, "layers": []}
    try:
        if ctx.kind == "onnx":
            _build_onnx(ctx, recipe, folder, record)
        else:
            _build_torch(ctx, recipe, folder, record, progress)
        record["metric"] = _score(ctx, folder / "model.onnx")
        if ctx.base_metric is not None:
            d = record["metric"] - ctx.base_metric
            record["drop"] = -d if ctx.higher_is_better else d
    except (SmallifyError, RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            NotImplementedError, AssertionError, OSError) as e:
        record.update(status="failed", reason=f"{type(e).__name__}: {first_line(e)}")
    record["seconds"] = round(time.perf_counter() - start, 2)
    write_record(folder, record)
    return record


def _score(ctx: Context, path: Path) -> float:
    from smallify.train import call_metric

    return call_metric(ctx.metric, str(path))


def _build_torch(ctx: Context, recipe: Recipe, folder: Path, record: dict, progress: bool) -> None:
    import smallify as sm
    from smallify.measure.macs import count_macs, count_params

    done, model, rows = _cached(ctx, recipe)
    model = copy.deepcopy(ctx.model) if model is None else model
    structure = model
    for i, s in enumerate(recipe.steps[done:], start=done):
        model = _apply_torch(model, s, ctx, folder, i, progress)
        rows += layer_choices(s.verb, getattr(model, "report", None))
        if s.verb != "quantize":
            structure = model
        if s.verb == "distill" and i + 1 < len(recipe.steps):
            _keep(ctx, recipe, i + 1, model, rows)
    record["layers"] = rows
    record["macs"], record["params"] = int(count_macs(structure, ctx.example)), int(count_params(structure))
    sm.export_onnx(model, folder / "model.onnx", ctx.example)
    record["size_bytes"] = (folder / "model.onnx").stat().st_size
    try:
        sm.save(model, folder / "model.smallify")
        record["container_bytes"] = (folder / "model.smallify").stat().st_size
    except SmallifyError as e:
        record["reason"] = f"not saved as .smallify: {first_line(e)}"


def _build_onnx(ctx: Context, recipe: Recipe, folder: Path, record: dict) -> None:
    import smallify as sm

    if len(recipe.steps) > 1 or any(s.verb != "quantize" for s in recipe.steps):
        raise SmallifyError(f"an ONNX model takes one quantize step; got {recipe.name}")
    out = folder / "model.onnx"
    if not recipe.steps:
        shutil.copyfile(ctx.model, out)
    else:
        s = recipe.steps[0]
        eval_fn = ctx.metric if isinstance(s.config, sm.MixedPrecision) else None
        result = sm.quantize(str(ctx.model), s.config, data=ctx.calib, out=out, eval_fn=eval_fn, progress=False)
        record["layers"] = layer_choices("quantize", result.report)
    record["size_bytes"] = out.stat().st_size


def write_record(folder: Path, record: dict) -> None:
    from smallify.files import write_atomic

    text = json.dumps(record, indent=1)
    write_atomic(folder / "record.json", lambda tmp: Path(tmp).write_text(text))


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "record.json").read_text())
    except (OSError, ValueError):
        return None


def build_job(args) -> dict:
    """Worker-process entry: ``build(*args)`` with one thread per worker unless the context sets threads."""
    return build(*args)
