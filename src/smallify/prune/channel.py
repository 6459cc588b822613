"""Structured (channel / filter) pruning that physically removes channels.

``prune(model, ChannelPrune(ratio=0.4), example_inputs, data=calib)`` builds the dependency graph
(``graph.py``), scores every prunable group's channels with an importance criterion, removes the lowest, and
slices every layer dimension of the group at once (convolutions, BatchNorm, depthwise groups, the Linear after
a flatten): the result is the same ``nn.Module`` class with smaller layers, exportable to ONNX.

Importance criteria are plain callables ``fn(model, group, stats) -> tensor[group.size]`` (higher: keep):
``l2`` / ``l1`` (norms of the producing filters), ``bn_scale`` (|gamma| of the group's BatchNorms, as in
Network Slimming), ``taylor`` (|sum(w * dL/dw)| per filter, first-order Taylor, on ``data`` with labels),
``activation`` (mean post-ReLU activation on ``data``) and ``apoz`` (1 - average percentage of zeros, as in
Network Trimming). ``reconstruct=True`` refits each layer that reads a pruned tensor by least squares on
``data`` (channel selection + reconstruction, He et al. 2017), so that little or no retraining is needed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smallify.config import Config, check_config
from smallify.data import first_batches, inputs_and_labels, run_hooked
from smallify.report import attach
from smallify.errors import ConfigError, DataError, ModelError
from smallify.measure.macs import count_macs, count_params
from smallify.prune.branches import choose_branches, remove_branches
from smallify.progress import track
from smallify.prune.graph import DependencyGraph, Group, build
from smallify.prune.hf import sync_config
from smallify.prune.resize import resizer

CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)   # outputs [N, C, ...]

CRITERIA = ("l2", "l1", "bn_scale", "taylor", "activation", "apoz")
NEEDS_DATA = {"taylor", "activation", "apoz"}


@dataclasses.dataclass
class ChannelPrune(Config):
    """``ratio``: fraction of channels removed, in [0, 1): from every prunable group (``scope='layer'``;
    ``layer_ratios`` overrides it per layer pattern) or
    overall, ranked across groups by importance normalized per group (``scope='global'``, at most
    ``max_group_ratio`` of any group). ``importance``: a name in CRITERIA or a callable. ``round_to``: kept
    channel counts are multiples of it. ``ignore``: fnmatch patterns of layers whose output channels stay.
    ``branches``: residual branches removed whole before the channels are pruned (``branches.py``: the ones
    whose removal changes the output least per MAC saved, on ``data``); on CPU runtimes this is what removes
    per-layer overhead, which narrower layers keep."""

    kind = "channel_prune"
    verbs = ("prune",)
    ratio: float = 0.5
    scope: str = "layer"
    importance: str = "l2"
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    max_group_ratio: float = 0.9
    reconstruct: bool = False
    layer_ratios: dict = dataclasses.field(default_factory=dict)
    branches: int = 0

    def ratio_for(self, producers: list[str]) -> float:
        """``layer_ratios`` (fnmatch pattern -> ratio, first match over the group's producing layers) or ``ratio``."""
        import fnmatch

        for pattern, r in self.layer_ratios.items():
            if any(fnmatch.fnmatchcase(p, pattern) for p in producers):
                return r
        return self.ratio

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio={self.ratio!r} is not supported; accepted: a number in [0, 1) (the fraction "
                              "of channels removed)")
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope={self.scope!r} is not supported; accepted: 'layer', 'global'")
        if not callable(self.importance) and self.importance not in CRITERIA:
            raise ConfigError(f"importance={self.importance!r} is not supported; accepted: {', '.join(CRITERIA)} "
                              "or a callable(model, group, stats)")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to={self.round_to!r} must be an integer >= 1")
        if not 0 < self.max_group_ratio < 1:
            raise ConfigError(f"max_group_ratio={self.max_group_ratio!r} must lie in (0, 1)")
        if isinstance(self.branches, bool) or not isinstance(self.branches, int) or self.branches < 0:
            raise ConfigError(f"branches={self.branches!r} is not supported; accepted: an integer >= 0 (residual "
                              "branches removed whole)")
        self.ignore = (self.ignore,) if isinstance(self.ignore, str) else tuple(self.ignore)
        for pattern, r in self.layer_ratios.items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ConfigError(f"layer_ratios[{pattern!r}]={r!r} is not supported; accepted: a number in [0, 1)")

    def to_dict(self):
        d = super().to_dict()
        if callable(self.importance):
            d["importance"] = getattr(self.importance, "__name__", "callable")
        return d


@dataclasses.dataclass
class PruneReport:
    config: dict
    groups: list[dict]            # one per group: producers, channels before/after, or why frozen
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    seconds: float
    branches: list = dataclasses.field(default_factory=list)   # removed residual branches, in order
    notes: list = dataclasses.field(default_factory=list)      # e.g. a Hugging Face config's sizes brought in line

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        pruned = [g for g in self.groups if g.get("after") is not None and g["after"] < g["before"]]
        unchanged = [g for g in self.groups if g.get("after") is not None and g["after"] >= g["before"]]
        lines = [f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.3f}x); params "
                 f"{self.params_before:,} -> {self.params_after:,}; {len(pruned)} group(s) pruned"
                 + (f", {len(unchanged)} prunable but unchanged" if unchanged else "")]
        lines += [f"  {note}" for note in self.notes]
        for b in self.branches:
            lines.append(f"  removed branch {b['branch']} ({', '.join(b['layers'])}): output error "
                         f"{b['output_error']:.3f}, MACs saved {b['macs_saved']:.3f} (alone)")
        for g in self.groups:
            if g.get("after") is not None and g["after"] < g["before"]:
                rows = g.get("rows_per_channel")
                unit = f" (heads: {'/'.join(map(str, rows))} rows each)" if rows else ""
                lines.append(f"  {', '.join(g['producers'])}: {g['before']} -> {g['after']} channels{unit}")
            elif g.get("after") is not None:
                lines.append(f"  unchanged: {', '.join(g['producers'])} ({g['before']} channels)")
            else:
                lines.append(f"  kept: {', '.join(g['producers']) or '-'} ({g['frozen']})")
        return "\n".join(lines)


def _part(t: torch.Tensor, slot, size: int) -> torch.Tensor:
    """The rows of ``t`` (indexed by the slot's module dimension) that belong to the group, one per channel: a
    channel of ``slot.factor`` rows (an attention head) gets them side by side (summed, for a vector)."""
    rows = t[slot.offset: slot.offset + size * slot.factor]
    if slot.factor == 1:
        return rows
    return rows.reshape(size, -1) if t.ndim > 1 else rows.reshape(size, slot.factor).sum(1)


def _out_rows(m: nn.Module) -> torch.Tensor:
    """``m``'s weight with one row per output channel (a layer stored transposed says so in its resize handler)."""
    rows = getattr(resizer(m), "out_rows", None)
    return (rows(m) if rows is not None else m.weight).detach().flatten(1)


def _slot_rows(model_modules, group: Group, dims=("out", "dw")) -> list[torch.Tensor]:
    return [_part(_out_rows(model_modules[s.module]), s, group.size) for s in group.slots if s.dim in dims]


def l2(modules, group: Group, stats) -> torch.Tensor:
    return sum(r.pow(2).sum(1) for r in _slot_rows(modules, group)).sqrt()


def l1(modules, group: Group, stats) -> torch.Tensor:
    return sum(r.abs().sum(1) for r in _slot_rows(modules, group))


def bn_scale(modules, group: Group, stats) -> torch.Tensor:
    gammas = [_part(modules[s.module].weight.detach().abs(), s, group.size) for s in group.slots if s.dim == "bn"]
    if not gammas:
        raise ConfigError(f"importance 'bn_scale' needs a BatchNorm after every pruned layer; {group.describe()} "
                          "has none (use 'l2' or ignore it)")
    return sum(gammas)


def taylor(modules, group: Group, stats) -> torch.Tensor:
    return sum(_part((_out_rows(modules[s.module]) * stats["grads"][s.module].flatten(1)).sum(1).abs(), s, group.size)
               for s in group.slots if s.dim in ("out", "dw"))


def activation(modules, group: Group, stats) -> torch.Tensor:
    return sum(_part(stats["mean"][s.module], s, group.size) for s in _act_slots(group)) / len(_act_slots(group))


def apoz(modules, group: Group, stats) -> torch.Tensor:
    return 1.0 - sum(_part(stats["zeros"][s.module], s, group.size) for s in _act_slots(group)) / len(_act_slots(group))


BUILTIN: dict[str, Callable] = {"l2": l2, "l1": l1, "bn_scale": bn_scale, "taylor": taylor, "activation": activation,
                                "apoz": apoz}


def _act_slots(group: Group):
    """Where a group's activations are observed: its BatchNorms (ReLU applied), else its producers."""
    return [s for s in group.slots if s.dim == "bn"] or [s for s in group.slots if s.dim in ("out", "dw")]


def collect_stats(graph: DependencyGraph, criterion: str, data) -> dict:
    """What data-driven criteria need: per-layer gradients (taylor), mean activation and zero fraction."""
    model, modules = graph.model, graph.modules
    batches = first_batches(data)
    if not batches:
        raise DataError(f"importance {criterion!r} needs data= (calibration batches"
                        f"{', with labels' if criterion == 'taylor' else ''})")
    stats: dict = {"grads": {}, "mean": {}, "zeros": {}}
    if criterion == "taylor":
        model.zero_grad()
        for b in batches:
            x, y = inputs_and_labels(b)
            if y is None:
                raise DataError("importance 'taylor' needs labels: give batches of (inputs, labels)")
            logits = getattr(out := model(x), "logits", out)          # a Hugging Face model's output
            if logits.ndim == y.ndim + 1 and logits.ndim > 2:         # per token: [B, T, vocab] and [B, T]
                logits, y = logits.flatten(0, -2), y.flatten()
            F.cross_entropy(logits, y).backward()
        transposed = {n for n, m in modules.items() if getattr(resizer(m), "out_rows", None) is not None}
        stats["grads"] = {n: (m.weight.grad.t() if n in transposed else m.weight.grad).detach().clone()
                          for n, m in modules.items()
                          if (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) or n in transposed) and m.weight.grad is not None}
        model.zero_grad()
        return stats
    names = {s.module for g in graph.prunable() for s in _act_slots(g)}
    sums, zeros, counts = {}, {}, {}

    def hook(name):
        def fn(m, args, out):
            a = torch.relu(out.detach())
            axis = 1 if a.ndim == 4 or isinstance(m, CHANNELS_FIRST) else a.ndim - 1
            dims = [d for d in range(a.ndim) if d != axis]
            sums[name] = sums.get(name, 0) + a.sum(dims)
            zeros[name] = zeros.get(name, 0) + (a == 0).float().sum(dims)
            counts[name] = counts.get(name, 0) + a.numel() / a.shape[axis]
        return fn

    run_hooked(model, batches, {n: hook(n) for n in names}, modules)
    stats["mean"] = {n: sums[n] / counts[n] for n in names}
    stats["zeros"] = {n: zeros[n] / counts[n] for n in names}
    return stats


def _keep_count(n: int, ratio: float, round_to: int) -> int:
    """Channels kept when at least ``ratio`` of ``n`` go, rounded to a multiple of ``round_to``."""
    keep = int(n * (1 - ratio) + 1e-9)
    if keep <= 0:
        return 0
    return min(n, max(round_to, int(round(keep / round_to)) * round_to))


def choose(graph: DependencyGraph, config: ChannelPrune, stats: dict) -> dict[int, torch.Tensor]:
    """Group id -> sorted indices of the channels kept."""
    fn = config.importance if callable(config.importance) else BUILTIN[config.importance]
    groups = graph.prunable()
    scores = {}
    for g in groups:
        s = torch.as_tensor(fn(graph.modules, g, stats), dtype=torch.float32).flatten()
        if s.numel() != g.size:
            raise ModelError(f"importance returned {s.numel()} scores for {g.describe()}; expected {g.size}")
        scores[g.id] = s
    counts = {}
    if config.scope == "layer":
        counts = {g.id: _keep_count(g.size, config.ratio_for(g.producers), math.lcm(config.round_to, g.multiple))
                  for g in groups}
    else:
        normed = torch.cat([scores[g.id] / scores[g.id].mean().clamp_min(1e-12) for g in groups])
        owner = torch.cat([torch.full((g.size,), i) for i, g in enumerate(groups)])
        remove = int(round(config.ratio * len(normed)))
        order = torch.argsort(normed)
        removed = torch.zeros(len(groups), dtype=torch.long)
        for idx in order.tolist():
            if remove == 0:
                break
            gi = int(owner[idx])
            if removed[gi] + 1 <= int(groups[gi].size * config.max_group_ratio):
                removed[gi] += 1
                remove -= 1
        counts = {g.id: _keep_count(g.size, float(removed[i]) / g.size, math.lcm(config.round_to, g.multiple))
                  for i, g in enumerate(groups)}
    keep = {}
    for g in groups:
        k = counts[g.id]
        if k < 1:
            raise ConfigError(f"pruning would leave {g.describe()} with no channels; lower its ratio or add "
                              "the layer to ignore")
        keep[g.id] = torch.sort(torch.topk(scores[g.id], k).indices).values
    return keep


def _expand(idx: torch.Tensor, offset: int, factor: int) -> torch.Tensor:
    return (offset + (idx[:, None] * factor + torch.arange(factor)[None, :])).flatten()


def apply(model: nn.Module, graph: DependencyGraph, keep: dict[int, torch.Tensor]) -> nn.Module:
    """Slice every slot of every pruned group (on ``model``, in place)."""
    modules = dict(model.named_modules())
    # module -> dim -> the original indices removed
    drop: dict[tuple[str, str], list[torch.Tensor]] = {}
    for g in graph.groups:
        if g.id not in keep:
            continue
        removed = torch.tensor(sorted(set(range(g.size)) - set(keep[g.id].tolist())), dtype=torch.long)
        if len(removed) == 0:
            continue
        for s in g.slots:
            drop.setdefault((s.module, s.dim), []).append(_expand(removed, s.offset, s.factor))
    for (name, dim), parts in drop.items():
        m = modules[name]
        handler = resizer(m)
        if handler is None or dim not in handler.sizes(m):
            raise ModelError(f"internal: layer {name!r} ({type(m).__name__}) has no resize handler for {dim!r}")
        gone = set(torch.cat(parts).tolist())
        idx = torch.tensor([i for i in range(handler.sizes(m)[dim]) if i not in gone], dtype=torch.long)
        if dim in ("out", "dw"):
            m._smallify_kept_out = idx
        elif dim == "in":
            m._smallify_kept_in = idx          # for least-squares reconstruction
        handler.keep(m, dim, idx)
    return model


def prune(model: nn.Module, config: ChannelPrune | None = None, example_inputs=None, data=None,
          progress: bool = False) -> nn.Module:
    """A copy of ``model`` with the lowest-importance channels removed; ``prune_report`` says what changed.
    ``progress``: progress bars for the long steps (capturing layer inputs, least-squares reconstruction)."""
    config = check_config(config, ChannelPrune, "prune") or ChannelPrune()
    if example_inputs is None:
        raise DataError("prune needs example_inputs (a batch the model accepts) to trace shapes")
    start = time.perf_counter()
    model = copy.deepcopy(model).eval()
    macs0, params0 = count_macs(model, example_inputs), count_params(model)
    removed, chosen = choose_branches(model, config.branches, example_inputs, data, progress=progress)
    if chosen:
        model = remove_branches(model, chosen).eval()
    graph = build(model, example_inputs, config.ignore)
    if not graph.prunable():
        frozen = sorted({g.frozen for g in graph.groups if g.frozen})
        raise ModelError(f"nothing to prune in {type(model).__name__}: every channel group is frozen ({'; '.join(frozen)})")
    crit = config.importance if isinstance(config.importance, str) else None
    stats = collect_stats(graph, crit, data) if crit in NEEDS_DATA else {}
    keep = choose(graph, config, stats)
    recon = _capture_inputs(model, graph, keep, data, progress) if config.reconstruct else None
    apply(model, graph, keep)
    if recon is not None:
        _reconstruct(model, recon, progress=progress)
    for m in model.modules():
        for attr in ("_smallify_kept_in", "_smallify_kept_out"):
            if hasattr(m, attr):
                delattr(m, attr)
    report_groups = []
    for g in graph.groups:
        entry = {"producers": g.producers, "before": g.size}
        rows = list(dict.fromkeys(s.factor for s in g.slots if s.dim == "out"))
        if rows and rows != [1]:
            entry["rows_per_channel"] = rows          # a channel of several rows: an attention head (or a GQA group)
        if g.id in keep:
            entry["after"] = len(keep[g.id])
        else:
            entry["frozen"] = g.frozen or "no producing layer"
        if g.producers:
            report_groups.append(entry)
    notes = sync_config(model, report_groups)
    report = PruneReport(config.to_dict(), report_groups, macs0, count_macs(model, example_inputs),
                         params0, count_params(model), time.perf_counter() - start, removed, notes)
    return attach(model, report, "prune_report")


def _capture_inputs(model, graph: DependencyGraph, keep, data, progress: bool = False):
    """The inputs of every layer whose input channels shrink, on ``data`` (before pruning), with the
    layer's original output: what least squares refits the smaller layer to."""
    batches = first_batches(data, 256)
    if not batches:
        raise DataError("reconstruct=True needs data= (calibration batches)")
    modules = graph.modules
    names = sorted({s.module for g in graph.groups if g.id in keep and len(keep[g.id]) < g.size
                    for s in g.slots if s.dim == "in"})
    seen: dict[str, list] = {n: [] for n in names}
    run_hooked(model, track(batches, "capturing layer inputs", progress),
               {n: (lambda m, a, o, n=n: seen[n].append((a[0].detach(), o.detach()))) for n in names}, modules)
    return seen


def _reconstruct(model, seen: dict, max_rows: int = 40000, ridge: float = 1e-3, progress: bool = False) -> None:
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(0)
    for name, pairs in track(list(seen.items()), "least-squares reconstruction", progress):
        m = modules[name]
        # the kept input channels are those whose columns survived: rebuild the pruned input by matching
        x = torch.cat([p[0] for p in pairs])
        y = torch.cat([p[1] for p in pairs])
        kept_out = getattr(m, "_smallify_kept_out", None)
        if kept_out is not None:
            y = y[:, kept_out] if y.ndim == 4 else y[..., kept_out]
        transposed = getattr(resizer(m), "out_rows", None) is not None      # transformers' Conv1D: [in, out]
        if not isinstance(m, (nn.Conv2d, nn.Linear)) and not transposed:
            continue                  # reconstruction knows Conv2d (unfolded patches) and Linear (and Conv1D)
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                continue
            keep_in = _kept_in_channels(m)
            xs = x[:, keep_in]
            cols = F.unfold(xs, m.kernel_size, m.dilation, m.padding, m.stride)        # [N, Cin*k*k, L]
            a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            t = (y - (m.bias.view(1, -1, 1, 1) if m.bias is not None else 0)).flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
        else:
            keep_in = _kept_in_channels(m)
            a = x[..., keep_in].reshape(-1, len(keep_in))
            t = (y - (m.bias if m.bias is not None else 0)).reshape(-1, y.shape[-1])
        if a.shape[0] > max_rows:
            rows = torch.randperm(a.shape[0], generator=gen)[:max_rows]
            a, t = a[rows], t[rows]
        a64, t64 = a.double(), t.double()
        gram = a64.T @ a64
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
        w = torch.linalg.solve(gram, a64.T @ t64).T.float()                            # [Cout, Cin*k*k]
        with torch.no_grad():
            m.weight.copy_(w.T if transposed else w.reshape(m.weight.shape))


def _kept_in_channels(m: nn.Module) -> torch.Tensor:
    kept = getattr(m, "_smallify_kept_in", None)
    if kept is None:
        raise ModelError("internal: reconstruction lost track of the kept input channels")
    return kept
