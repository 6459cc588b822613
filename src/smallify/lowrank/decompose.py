"""``decompose(model, LowRank(...), data=None)``: Linear and Conv2d layers become smaller plain layers in a row.

Steps: pick the layers (Linear, Conv2d with groups 1; ``layers`` / ``skip``), run ``data`` once to learn each
layer's input shape and the second moments of its input patches, list each layer's candidate forms (method x
rank, ranks multiples of ``round_to``, only forms with fewer MACs than the layer), score them by the relative
output error on the data (``factor.py``), choose one per layer (fixed rank, energy, or one global MAC / parameter
budget by Lagrangian relaxation: least summed error for the MACs kept), time each chosen form against the
layer on the target runtime (``speed.py``) and replace only the layers that got faster. The result is ready
for ``distill`` (the original as teacher), ``export_onnx``, ``save`` and the other verbs.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from smallify.config import check_config
from smallify.errors import ConfigError, ModelError
from smallify.lowrank import factor as fa
from smallify.lowrank.config import LowRank
from smallify.lowrank.modules import Decomposed, build, empty_parts
from smallify.progress import track
from smallify.quant.config import first_match
from smallify.quant.modules import replace_module

MAX_MOMENT_DIM = 8192     # patch sizes above this are scored in weight space (the D x D moments would not fit)


@dataclasses.dataclass
class LowRankLayer:
    name: str
    op: str
    status: str                 # 'decomposed' or 'kept'
    method: str = ""
    ranks: list = dataclasses.field(default_factory=list)
    full_rank: int = 0
    error: float = 0.0          # relative output error before fine-tuning (weight-space without data)
    macs_before: int = 0        # per sample (0: unknown, no data)
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    ms_before: float | None = None
    ms_after: float | None = None
    reason: str = ""


@dataclasses.dataclass
class DecomposeReport:
    config: dict
    layers: list[LowRankLayer]
    macs_before: int = 0        # the whole model, per sample
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    @property
    def decomposed(self) -> list[str]:
        return [l.name for l in self.layers if l.status == "decomposed"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["decomposed"] = self.decomposed
        return d

    def __str__(self) -> str:
        macs = (f", MACs x{self.macs_after / self.macs_before:.3f}" if self.macs_before else "")
        lines = [f"{len(self.decomposed)} layer(s) decomposed, {len(self.layers) - len(self.decomposed)} kept; "
                 f"params x{self.params_after / max(self.params_before, 1):.3f}{macs}, {self.seconds:.1f} s"]
        for l in self.layers:
            timing = (f", {l.ms_before:.3f} -> {l.ms_after:.3f} ms" if l.ms_before is not None else "")
            if l.status == "decomposed":
                lines.append(f"  {l.name:36s} {l.op:7s} {l.method:9s} ranks {l.ranks} of {l.full_rank}, "
                             f"error {l.error:.4f}, params {l.params_before} -> {l.params_after}{timing}")
            else:
                lines.append(f"  {l.name:36s} {l.op:7s} kept: {l.reason}{timing}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Option:
    method: str
    ranks: tuple[int, ...]
    macs: int
    params: int
    error: float = math.nan
    factors: fa.Factors | None = None


def _methods_for(m: nn.Module, method: str) -> tuple[str, ...]:
    """The forms ``method`` can write ``m`` as (none for grouped convolutions and string padding)."""
    if isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str)):
        return ()
    pointwise = isinstance(m, nn.Linear) or tuple(m.kernel_size) == (1, 1)
    if method == "auto":
        return ("svd",) if pointwise else ("spatial", "tucker")
    if method == "svd":
        return ("svd",) if pointwise else ()
    return () if pointwise else (method,)


def _why_not(m: nn.Module, method: str) -> str:
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        return f"grouped convolution (groups={m.groups})"
    if isinstance(m, nn.Conv2d) and isinstance(m.padding, str):
        return f"padding={m.padding!r}"
    if method == "svd":
        return "svd decomposes Linear layers and 1x1 convolutions"
    return f"{method} decomposes k x k convolutions (k > 1); use method='svd' for Linear and 1x1"


def _part_cost(p: nn.Module, shape: list[int] | None) -> tuple[int, list[int] | None]:
    """(MACs per sample, output shape) of one plain layer on an input of ``shape`` (no batch axis)."""
    if isinstance(p, nn.Linear):
        tokens = math.prod(shape[:-1]) if shape else 1
        return tokens * p.in_features * p.out_features, (shape[:-1] + [p.out_features]) if shape else None
    if shape is None:
        return 0, None
    h, w = shape[-2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p.kernel_size, p.stride, p.padding, p.dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return ho * wo * p.out_channels * (p.in_channels // p.groups) * kh * kw, [p.out_channels, ho, wo]


def _cost(parts: list[nn.Module], shape: list[int] | None) -> tuple[int, int]:
    macs = 0
    for p in parts:
        m, shape = _part_cost(p, shape)
        macs += m
    return macs, sum(p.weight.numel() + (p.bias.numel() if p.bias is not None else 0) for p in parts)


def _round_up(x: float, step: int) -> int:
    return max(step, int(math.ceil(x / step - 1e-9)) * step)


def _candidates(m: nn.Module, method: str, config: LowRank) -> list[tuple[int, ...]]:
    """The rank tuples to consider for ``m`` with ``method`` (before the break-even filter)."""
    W = m.weight
    O, C = W.shape[:2]
    step, r = config.round_to, config.rank
    if method == "tucker":
        if r == "vbmf":
            return [tuple(min(_round_up(v, step), n) for v, n in zip(fa.tucker_vbmf_ranks(W.detach()), (O, C)))]
        if isinstance(r, int):
            return [(min(r, O), min(r, C))]
        if isinstance(r, float):
            return [(min(_round_up(r * O, step), O), min(_round_up(r * C, step), C))]
        n = max(1, max(O, C) // step)
        return sorted({(min(_round_up(t / n * O, step), O), min(_round_up(t / n * C, step), C)) for t in range(1, n + 1)})
    full = full_rank(m, method)
    if method == "separable":
        if isinstance(r, int):
            return [(r,)]
        if isinstance(r, float):
            return [(max(1, round(r * full)),)]
        return [(t,) for t in range(1, full + 1)]
    if isinstance(r, int):
        return [(r,)]
    if isinstance(r, float):
        return [(min(_round_up(r * full, step), full),)]
    return [(t,) for t in range(step, full, step)] or [(1,)]


MAX_CANDIDATES = 24       # per layer and method: wider layers get coarser rank steps (scoring costs O*D^2 each)


def _thin(ranks: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    if len(ranks) <= MAX_CANDIDATES:
        return ranks
    keep = {round(i * (len(ranks) - 1) / (MAX_CANDIDATES - 1)) for i in range(MAX_CANDIDATES)}
    return [r for i, r in enumerate(ranks) if i in keep]


def full_rank(m: nn.Module, method: str) -> int:
    W = m.weight
    if method == "svd":
        return min(W.shape[0], W[0].numel())
    if method == "spatial":
        return min(W.shape[1] * W.shape[2], W.shape[0] * W.shape[3])
    if method == "separable":
        return min(math.prod(W.shape[2:]), W.shape[0])
    return max(W.shape[0], W.shape[1])


class _Scorer:
    """Factorizations of one layer with one method, from one SVD / decomposition, scored on the data."""

    def __init__(self, m: nn.Module, method: str, S: torch.Tensor | None, config: LowRank):
        self.W4 = m.weight.detach().double()
        self.W = self.W4.reshape(self.W4.shape[0], -1)
        self.method, self.S, self.refit, self.damp = method, S, S is not None, config.damp
        self.fit = {"svd": lambda: fa.SVDFit(self.W, S, config.damp), "spatial": lambda: fa.SpatialFit(self.W4),
                    "separable": lambda: fa.SeparableFit(self.W4), "tucker": lambda: fa.tucker_bases(self.W4)}[method]()

    def factors(self, ranks: tuple[int, ...], final: bool = False) -> fa.Factors:
        """The factorization at ``ranks``; Tucker is scored after 3 HOOI sweeps and built to convergence."""
        if self.method == "svd":
            f = fa.svd_factors(self.W4 if self.W4.ndim == 4 else self.W, ranks[0], fit=self.fit)
        elif self.method == "tucker":
            f = fa.tucker_factors(self.W4, *ranks, sweeps=50 if final else 3, bases=self.fit)
        else:
            f = self.fit.at(ranks[0])
        if self.refit and self.method != "svd":      # the whitened SVD is already the least-squares optimum
            f = fa.with_last(f, fa.refit_last(self.W, f.K, self.S))
        return f

    def error(self, f: fa.Factors) -> float:
        if self.method == "svd" and self.S is not None:
            return self.fit.tail_error(f.ranks[0])
        return fa.relative_error(self.W, f.composite(), self.S)


def input_stats(model: nn.Module, chosen: dict[str, nn.Module], data) -> tuple[dict, dict, torch.Tensor | None]:
    """(name -> input shape without batch, name -> patch second moments (D x D) or None, the first input)."""
    from smallify.data import first_batches, inputs_and_labels, run_hooked

    batches = first_batches(data, 256)
    if not batches:
        return {}, {}, None
    shapes, sums = {}, {}

    def hook_for(name, m):
        def hook(module, args, output):
            x = args[0].detach()
            shapes.setdefault(name, list(x.shape[1:]))
            if isinstance(m, nn.Linear):
                rows = x.reshape(-1, x.shape[-1])
            else:
                rows = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
                rows = rows.reshape(-1, rows.shape[-1])
            if rows.shape[1] > MAX_MOMENT_DIM:
                sums[name] = None
                return
            rows = rows.double()
            s = sums.setdefault(name, [0.0, 0])
            if s is not None:
                s[0] = s[0] + rows.T @ rows
                s[1] += rows.shape[0]
        return hook

    run_hooked(model, batches, {n: hook_for(n, m) for n, m in chosen.items()}, chosen)
    moments = {n: (None if s is None else s[0] / max(s[1], 1)) for n, s in sums.items()}
    return shapes, moments, inputs_and_labels(batches[0])[0]


def _check_budget(options: dict[str, list[_Option]], config: LowRank, fixed_cost: int, total: int) -> None:
    """A ConfigError when even the smallest rank of every layer keeps more than the ``macs`` / ``params`` budget."""
    if config.macs is None and config.params is None:
        return
    key = "params" if config.params is not None else "macs"
    least = fixed_cost + sum(min(getattr(o, key) for o in opts) for opts in options.values())
    if least > getattr(config, key) * total:
        raise ConfigError(f"{key}={getattr(config, key)} cannot be met: every decomposable layer at its smallest rank "
                          f"still keeps {least / total:.3f} of the model's {'MACs' if key == 'macs' else key}; "
                          f"accepted: {key} >= {math.ceil(least / total * 1000) / 1000}")


def _choose(options: dict[str, list[_Option]], config: LowRank, fixed_cost: int, total: int) -> dict[str, _Option | None]:
    """One option per layer (None: kept). Fixed rank: the one candidate; energy: the cheapest with error <=
    1 - energy; budget: least summed error with sum(cost) <= budget * total, by bisection on the price of a MAC."""
    key = "params" if config.params is not None else "macs"
    if config.macs is None and config.params is None:
        out = {}
        for name, opts in options.items():
            ok = opts if config.energy is None else [o for o in opts if o.error <= 1 - config.energy + 1e-12]
            out[name] = min(ok, key=lambda o: (o.macs or o.params, o.error)) if ok else None
        return out
    budget = (config.macs if key == "macs" else config.params) * total

    def pick(price: float) -> tuple[dict, float]:
        out, cost = {}, fixed_cost
        for name, opts in options.items():
            best = min(opts, key=lambda o: o.error + price * getattr(o, key) / total)
            out[name] = best
            cost += getattr(best, key)
        return out, cost

    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pick(mid)[1] <= budget else (mid, hi)
    chosen = pick(hi)[0]
    return {n: (None if o.method == "keep" else o) for n, o in chosen.items()}


def decompose(model: nn.Module, config: LowRank | None = None, data=None, progress: bool = True) -> nn.Module:
    """A copy of ``model`` whose Linear and Conv2d layers (chosen by ``config``) are written as smaller plain
    layers (``Decomposed``); ``data``: batches of inputs (activation-aware errors and refits, MACs, the speed
    check's shapes). The report (every layer: its form, ranks, error, MACs, timing, or why it was kept) is
    ``model.report``."""
    config = check_config(config, LowRank, "decompose") or LowRank()
    if not isinstance(model, nn.Module):
        raise ModelError(f"decompose() takes a torch.nn.Module; got {type(model).__name__} (for an ONNX file, "
                         "decompose the PyTorch model and export it)")
    from smallify.quant.weight_only import fold_batchnorm

    start = time.perf_counter()
    model = fold_batchnorm(model)      # a copy; folded first, so that quantizing later cannot fold a BatchNorm
    #                                   into a decomposed layer's last part by re-tracing (and losing) its structure
    inside = {n for n, m in model.named_modules() if isinstance(m, Decomposed)}
    reports: list[LowRankLayer] = []
    chosen: dict[str, nn.Module] = {}
    named = set()
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or any(name.startswith(p + ".") for p in inside):
            continue
        if config.layers and first_match(config.layers, (name,)) is None:
            continue
        named.add(name)
        op = type(m).__name__
        pattern = first_match(config.skip, (name,))
        methods = _methods_for(m, config.method)
        if pattern is not None:
            reports.append(LowRankLayer(name, op, "kept", reason=f"skipped by pattern {pattern!r}"))
        elif not methods:
            if config.layers:
                raise ConfigError(f"layer {name!r} ({op}) cannot be decomposed: {_why_not(m, config.method)}")
            reports.append(LowRankLayer(name, op, "kept", reason=_why_not(m, config.method)))
        elif not bool(torch.isfinite(m.weight).all()):
            raise ModelError(f"weight of layer {name!r} holds NaN or Inf; only finite weights can be decomposed")
        else:
            chosen[name] = m
    for pattern in config.layers:
        if not any(first_match((pattern,), (n,)) for n in named):
            raise ConfigError(f"layers: pattern {pattern!r} matches no Linear or Conv2d layer of the model")
    if not chosen:
        raise ModelError(f"LowRank(method={config.method!r}) found no layer to decompose"
                         + "".join(f"; {r.name}: {r.reason}" for r in reports[:3]) + "; nothing was changed")
    if data is None and (config.runtime is not None or config.macs is not None):
        need = "the speed check" if config.runtime is not None else "macs="
        raise ConfigError(f"{need} needs data= (one batch of inputs is enough: each layer's input shape); or pass "
                          "runtime=None" + (" and params= instead of macs=" if config.macs is not None else ""))
    shapes, moments, example = input_stats(model, chosen, data)
    if not config.aware:
        moments = {}
    total_macs = 0
    if example is not None:
        from smallify.measure.macs import count_macs

        total_macs = count_macs(model, example)
    total_params = sum(p.numel() for p in model.parameters())

    options: dict[str, list[_Option]] = {}
    scorers: dict[tuple[str, str], _Scorer] = {}
    base: dict[str, tuple[int, int]] = {}
    for name, m in chosen.items():
        shape = shapes.get(name)
        base[name] = _cost([m], shape)
        opts = [_Option("keep", (), *base[name], error=0.0)]
        reason = "no rank that is a multiple of round_to has fewer MACs than the layer"
        for method in _methods_for(m, config.method):
            full = full_rank(m, method)
            for ranks in _thin(_candidates(m, method, config)):
                if isinstance(config.rank, int) and config.rank >= full:
                    reason = f"rank {config.rank} >= the full rank {full} of {method}"
                    continue
                macs, params = _cost(empty_parts(m, method, ranks), shape)
                if (macs or params) >= (base[name][0] or base[name][1]):
                    if config.rank is not None:
                        reason = f"{method} at ranks {list(ranks)} has no fewer MACs than the layer (break-even)"
                    continue
                opts.append(_Option(method, ranks, macs, params))
        if len(opts) == 1:
            if config.layers and isinstance(config.rank, int):
                raise ConfigError(f"layer {name!r}: {reason}; accepted: rank >= 1 below the break-even rank")
            reports.append(LowRankLayer(name, type(m).__name__, "kept", macs_before=base[name][0],
                                        params_before=base[name][1], reason=reason))
            continue
        options[name] = opts if config.macs is not None or config.params is not None else opts[1:]
    if not options:
        raise ConfigError("no layer has a decomposed form smaller than itself at the ranks asked for"
                          + "".join(f"; {r.name}: {r.reason}" for r in reports[:3]))
    total = total_macs if config.params is None else total_params
    others = total - sum(base[n][0 if config.params is None else 1] for n in options)   # what no choice changes
    _check_budget(options, config, others, total)          # before the (slower) scoring
    for name, opts in track(list(options.items()), f"{config.describe()}: scoring", enabled=progress):
        for o in opts:
            if o.method == "keep":
                continue
            sc = scorers.get((name, o.method))
            if sc is None:
                sc = scorers[(name, o.method)] = _Scorer(chosen[name], o.method, moments.get(name), config)
            o.factors = sc.factors(o.ranks)
            o.error = sc.error(o.factors)
    picks = _choose(options, config, others, total)
    from smallify.lowrank.speed import SpeedCache

    cache = SpeedCache(config.runtime, config.threads) if config.runtime else None
    try:
        for name in track(list(options), f"{config.describe()}: building and timing", enabled=progress):
            m, o = chosen[name], picks[name]
            op = type(m).__name__
            layer = LowRankLayer(name, op, "kept", macs_before=base[name][0], params_before=base[name][1])
            reports.append(layer)
            if o is None:
                layer.reason = ("no rank meets energy=" f"{config.energy}" if config.energy is not None
                                else "the budget is spent better elsewhere")
                continue
            layer.method, layer.ranks, layer.error = o.method, list(o.ranks), o.error
            layer.full_rank, layer.macs_after, layer.params_after = full_rank(m, o.method), o.macs, o.params
            if o.method == "tucker":       # HOOI to convergence for the form that is built
                sc = scorers[(name, o.method)]
                o.factors = sc.factors(o.ranks, final=True)
                layer.error = o.error = sc.error(o.factors)
            new = build(m, o.factors)
            if cache is not None:
                in_shape = [config.batch] + shapes[name]
                layer.ms_before, layer.ms_after = cache.compare(m, list(new), in_shape)
                if layer.ms_after * config.min_speedup >= layer.ms_before:
                    layer.reason = (f"{o.method} ranks {list(o.ranks)} not faster on {config.runtime} "
                                    f"({layer.ms_before:.3f} -> {layer.ms_after:.3f} ms at batch {config.batch})")
                    continue
            layer.status = "decomposed"
            replace_module(model, name, new)
    finally:
        if cache is not None:
            cache.flush()
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    reports.sort(key=lambda l: order.get(l.name, 1 << 30))
    report = DecomposeReport(config.to_dict(), reports, seconds=time.perf_counter() - start)
    report.params_before, report.params_after = total_params, sum(p.numel() for p in model.parameters())
    if example is not None:
        from smallify.measure.macs import count_macs

        report.macs_before, report.macs_after = total_macs, count_macs(model, example)
    model.report = model.decompose_report = report
    return model
