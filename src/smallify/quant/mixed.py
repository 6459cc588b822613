"""Sensitivity, fallback and mixed precision: choose each layer's weight grid from measurements.

The search works on any model through two callables: ``evaluate(plan) -> metric`` (higher is better) and
the layers' weight counts; ``plan`` maps a layer to its weight bits (``config.candidates``) or 'float'.

1. Reference: the float model's metric; start: every layer at the widest candidate (INT8).
2. Fallback: while the drop exceeds ``max_drop``, measure each quantized layer alone in float and put the
   one that recovers most back in float (the first and last layers usually go first).
3. Sensitivity: for each layer and each narrower candidate, the metric with that layer alone lowered.
4. Allocation: lower layers greedily in order of sensitivity per byte saved; keep a lowering only while
   the whole plan's drop stays within ``max_drop``; stop when the size is within ``size_budget``.

Every layer's choice is reported with the measurement behind it. The metric is the user's ``eval_fn`` (task
accuracy, in its own units) or, without one, the output SQNR in dB against the float model on the
calibration data (then ``max_drop`` is in dB).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from smallify.errors import ConfigError
from smallify.progress import track
from smallify.quant.config import Int8Static, check_bits


@dataclasses.dataclass
class MixedPrecision(Int8Static):
    """INT8 activations; per-layer weight bits chosen among ``candidates`` (widest first) and, with
    ``fallback``, float, so that the metric drops by at most ``max_drop`` and the weights fit
    ``size_budget`` (a fraction of the all-INT8 weight bytes, e.g. 0.7). Needs ``max_drop`` or
    ``size_budget``. Pass ``eval_fn`` to ``smallify.quantize`` to judge by task metric."""

    kind = "mixed_precision"
    candidates: tuple[int, ...] = (8, 4)
    max_drop: float | None = None
    size_budget: float | None = None
    fallback: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.candidates = tuple(sorted(set(self.candidates), reverse=True))
        if not self.candidates:
            raise ConfigError("candidates is empty; give weight bit widths such as (8, 4)")
        for b in self.candidates:
            check_bits("candidates", b)
        if self.max_drop is None and self.size_budget is None:
            raise ConfigError("MixedPrecision needs max_drop (largest metric drop allowed) or size_budget "
                              "(fraction of the all-INT8 weight bytes), or both")
        if self.max_drop is not None and not float(self.max_drop) >= 0:
            raise ConfigError(f"max_drop={self.max_drop!r} must be a number >= 0")
        if self.size_budget is not None and not 0 < float(self.size_budget) <= 1:
            raise ConfigError(f"size_budget={self.size_budget!r} must lie in (0, 1]")

    def base(self, plan: dict[str, int | str]) -> Int8Static:
        """The plain static config that realizes ``plan`` (exact layer names as patterns)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Int8Static)}
        fields.update(weight_bits=self.candidates[0], layer_bits={_escape(k): v for k, v in plan.items()})
        return Int8Static(**fields)


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@dataclasses.dataclass
class LayerChoice:
    name: str
    choice: str           # 'int4', 'int8', 'float', ...
    reason: str


@dataclasses.dataclass
class Plan:
    reference: float                  # float model's metric
    metric: float                     # the chosen plan's metric
    int8_metric: float                # every layer at the widest candidate
    size_ratio: float                 # weight bytes relative to all at the widest candidate
    layers: list[LayerChoice]
    evaluations: int
    bits: dict[str, int | str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"mixed precision: metric {self.metric:.4f} (float {self.reference:.4f}, all-INT8 "
                 f"{self.int8_metric:.4f}); weights {self.size_ratio:.3f}x the all-INT8 bytes; "
                 f"{self.evaluations} evaluations"]
        lines += [f"  {c.name}: {c.choice} ({c.reason})" for c in self.layers]
        return "\n".join(lines)


def _label(choice) -> str:
    return "float" if choice == "float" else f"int{choice}"


def search(layers: dict[str, int], evaluate: Callable[[dict], float], reference: float, config: MixedPrecision,
           progress: bool = True) -> Plan:
    """Choose a plan; ``layers`` maps each layer to its weight count."""
    widest = config.candidates[0]
    plan: dict[str, int | str] = {name: widest for name in layers}
    evals = 0

    def measure(p: dict) -> float:
        nonlocal evals
        evals += 1
        return evaluate(p)

    def size(p: dict) -> float:
        bits = {k: (32 if v == "float" else v) for k, v in p.items()}
        return sum(layers[k] * bits[k] for k in layers) / sum(layers[k] * widest for k in layers)

    reasons: dict[str, str] = {}
    int8_metric = current = measure(plan)
    limit = None if config.max_drop is None else reference - float(config.max_drop)
    if limit is not None and current < limit and config.fallback:
        gains = {}
        for name in track(list(layers), "fallback sensitivity", progress):
            gains[name] = measure({**plan, name: "float"}) - current
        for name in sorted(gains, key=gains.get, reverse=True):
            if current >= limit:
                break
            plan[name] = "float"
            current = measure(plan)
            reasons[name] = f"fallback: float alone recovers {gains[name]:+.4f}"
    lower = config.candidates[1:]
    drops: dict[tuple[str, int], float] = {}
    quantized = [n for n in layers if plan[n] != "float"]
    if lower:
        for name in track(quantized, "sensitivity", progress):
            for b in lower:
                drops[(name, b)] = current - measure({**plan, name: b})
    # cheapest first: metric lost per bit saved
    order = sorted(drops, key=lambda k: max(drops[k], 0.0) / (layers[k[0]] * (widest - k[1])))
    for name, b in track(order, "allocation", progress):
        if config.size_budget is not None and config.max_drop is None and size(plan) <= config.size_budget:
            break
        if plan[name] == "float" or (plan[name] != widest and plan[name] <= b):
            continue
        trial = {**plan, name: b}
        m = measure(trial) if limit is not None else current - sum(
            max(drops[(n, v)], 0.0) for n, v in trial.items() if (n, v) in drops)
        if limit is None or m >= limit:
            plan, current = trial, (m if limit is not None else current)
            reasons[name] = f"alone drops {drops[(name, b)]:+.4f}; plan still within the bound"
        elif name not in reasons:
            reasons[name] = f"{_label(b)} alone drops {drops[(name, b)]:+.4f}; lowering it broke the bound"
    if limit is None:
        current = measure(plan)
    if config.size_budget is not None and size(plan) > config.size_budget + 1e-9:
        raise ConfigError(f"no plan fits size_budget={config.size_budget} within max_drop={config.max_drop}: the "
                          f"best found has {size(plan):.3f}x the INT8 weight bytes at metric {current:.4f} "
                          f"(float {reference:.4f}); allow a larger drop or budget, or add narrower candidates")
    if limit is not None and current < limit:
        raise ConfigError(f"max_drop={config.max_drop} cannot be met: the best plan reaches {current:.4f} against "
                          f"float {reference:.4f}" + ("" if config.fallback else "; fallback=True would allow "
                                                     "float layers"))
    choices = [LayerChoice(n, _label(plan[n]), reasons.get(n, "kept at the widest grid" if plan[n] == widest else ""))
               for n in layers]
    return Plan(reference, current, int8_metric, size(plan), choices, evals, plan)


def _spec(config: MixedPrecision, choice):
    from smallify.quant.modules import WeightSpec
    from smallify.quant.primitives import INT8_WEIGHT, IntFormat

    if choice == "float":
        return WeightSpec(None)
    if choice == 8 and config.reduce_range:
        choice = 7           # the 8-bit candidate on a 7-bit grid, as Int8Static.weight_spec gives it
    return WeightSpec(INT8_WEIGHT if choice == 8 else IntFormat(choice), config.per_channel, config.group_size)


def _sqnr_metric(reference_model, data, names, limit: int = 256):
    """Without eval_fn: output SQNR (dB) against the float model on up to ``limit`` calibration samples."""
    import torch

    from smallify import data as data_mod
    from smallify.quant.primitives import sqnr_db

    batches = list(data_mod.batches(data, names, limit=limit))
    with torch.no_grad():
        ref = [reference_model(*[b[n] for n in names]) for b in batches]

    def metric(model) -> float:
        with torch.no_grad():
            out = [model(*[b[n] for n in names]) for b in batches]
        return sqnr_db(torch.cat([r.flatten() for r in ref]), torch.cat([o.flatten() for o in out]))
    return metric


def mixed_module(model, config: MixedPrecision, data, eval_fn=None, progress: bool = True):
    """``quantize`` for a PyTorch module with ``MixedPrecision``: the searched plan, applied."""
    from smallify.quant import modules as qmod
    from smallify.quant.ptq import quantize_module
    from smallify.quant.report import LayerReport
    from smallify.train import call_metric

    gm = quantize_module(model, config.base({}), data, progress)
    twins = {n: m for n, m in gm.named_modules() if isinstance(m, qmod.QuantTwin)}
    if eval_fn is None:
        names = gm.input_names
        metric = _sqnr_metric(model.eval(), data, names)
        reference = None
    else:
        metric = eval_fn
        reference = call_metric(eval_fn, model.eval())

    def apply(plan: dict) -> None:
        for name, choice in plan.items():
            twins[name]._init_weight_quant(_spec(config, choice))

    def evaluate(plan: dict) -> float:
        apply(plan)
        return call_metric(metric, gm)

    if reference is None:   # SQNR: the all-widest plan is the reference, max_drop is in dB
        reference = evaluate({n: config.candidates[0] for n in twins})
    plan = search({n: m.weight.numel() for n, m in twins.items()}, evaluate, reference, config, progress)
    apply(plan.bits)
    gm.quant_config = config.base(plan.bits)
    reasons = {c.name: (c.choice, c.reason) for c in plan.layers}
    gm.quant_report.layers = [LayerReport(r.name, r.op, "float" if reasons.get(r.name, ("",))[0] == "float" else r.status,
                                          " — ".join(x for x in reasons[r.name] if x) if r.name in reasons else r.reason)
                              for r in gm.quant_report.layers]
    gm.mixed_plan = gm.quant_report.plan = plan
    return gm


