"""``cluster(model, config, data=None)``: every chosen layer's weights share a few values per scope.

BatchNorms are folded into the convolutions first (a model folded after clustering would no longer share its
weights); exact zeros (pruned weights) stay zero and are not clustered; each layer's codebook comes from the pure
math in ``kmeans.py`` and the layer becomes its shared twin (``modules.py``), ready for ``train`` / ``distill``
(the centroids learn, the indices stay), ``smallify.save`` (codebooks + entropy-coded indices) and
``export_onnx``.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from smallify.cluster import kmeans as km
from smallify.cluster.config import Binary, KMeans, PowerOfTwo, Share, Ternary
from smallify.cluster.modules import SharedTwin, rows_shape, twin_of
from smallify.config import check_config, configs_of
from smallify.errors import ConfigError, ModelError
from smallify.progress import track
from smallify.quant.config import first_match
from smallify.quant.modules import replace_module


@dataclasses.dataclass
class SharedLayer:
    name: str
    op: str
    status: str            # 'shared' or 'float'
    values: int = 0        # shared values per scope (k)
    codebooks: int = 0     # scopes (R)
    sqnr_db: float = 0.0   # of the shared weight against the float one, before fine-tuning
    reason: str = ""


@dataclasses.dataclass
class ClusterReport:
    config: dict
    layers: list[SharedLayer]
    seconds: float = 0.0

    @property
    def shared(self) -> list[str]:
        return [l.name for l in self.layers if l.status == "shared"]

    def to_dict(self) -> dict:
        return {"config": self.config, "seconds": self.seconds, "layers": [dataclasses.asdict(l) for l in self.layers]}

    def __str__(self) -> str:
        lines = [f"{len(self.shared)} layer(s) share their weights ({self.config['kind']}), "
                 f"{len(self.layers) - len(self.shared)} left in float, {self.seconds:.1f} s"]
        for l in self.layers:
            lines.append(f"  {l.name:40s} {l.op:10s} " + (f"{l.values} values x {l.codebooks} codebook(s), "
                                                          f"SQNR {l.sqnr_db:.1f} dB" if l.status == "shared"
                                                          else f"float: {l.reason}"))
        return "\n".join(lines)


def cluster(model: nn.Module, config: Share | None = None, data=None, progress: bool = True) -> nn.Module:
    """A copy of ``model`` whose Linear / Conv / Embedding weights (not in ``config.skip``) share values:
    ``KMeans`` (default), ``Binary``, ``Ternary``, ``PowerOfTwo`` or ``HashShare``. ``data`` (batches of
    inputs): importance weights for ``KMeans(weighted=True)``. The report is ``model.report``."""
    config = check_config(config, configs_of("cluster"), "cluster") or KMeans()
    if not isinstance(model, nn.Module):
        raise ModelError(f"cluster() takes a torch.nn.Module; got {type(model).__name__} (for an ONNX file, "
                         "cluster the PyTorch model and export it)")
    from smallify.cluster.hashing import HashShare, hash_share

    if isinstance(config, HashShare):
        return hash_share(model, config)
    from smallify.quant.weight_only import fold_batchnorm

    start = time.perf_counter()
    model = fold_batchnorm(model)      # a copy
    chosen, reports = [], []
    for name, m in model.named_modules():
        twin = twin_of(m)
        if twin is None:
            continue
        pattern = first_match(config.skip, (name,))
        if pattern is not None:
            reports.append(SharedLayer(name, type(m).__name__, "float", reason=f"skipped by pattern {pattern!r}"))
        else:
            chosen.append((name, m, twin))
    if not chosen:
        raise ModelError(f"{type(config).__name__} found no Linear, Conv or Embedding layer to share"
                         + (f" (all skipped by {list(config.skip)})" if config.skip else "")
                         + "; nothing was changed")
    for name, m, _ in chosen:
        _check_layer(name, m, config)
    importance = _importance(model, chosen, data) if isinstance(config, KMeans) and config.weighted else {}
    for name, m, twin in track(chosen, f"{config.describe()}", enabled=progress):
        shared, sqnr = share_layer(m, twin, config, importance.get(name))
        replace_module(model, name, shared)
        reports.append(SharedLayer(name, type(m).__name__, "shared", config.k, shared.rows[0], sqnr))
    model.cluster_config = config
    model.report = model.cluster_report = ClusterReport(config.to_dict(), reports, time.perf_counter() - start)
    return model


def _check_layer(name: str, m: nn.Module, config: Share) -> None:
    shape = tuple(m.weight.shape)
    try:
        r, n = rows_shape(shape, config.scope, config.group_size)
    except ConfigError as e:
        raise ConfigError(f"layer {name!r}: {e}") from None
    if isinstance(config, KMeans) and n < config.k:
        raise ConfigError(f"layer {name!r} has {n} weight(s) per {config.scope}, fewer than clusters={config.k}; "
                          f"accepted: clusters <= {n}, a wider scope, or skip=[{name!r}]")
    if not bool(torch.isfinite(m.weight).all()):
        raise ModelError(f"weight of layer {name!r} holds NaN or Inf; only finite weights can be clustered")


def share_layer(m: nn.Module, twin: type[SharedTwin], config: Share,
                importance: torch.Tensor | None = None) -> tuple[SharedTwin, float]:
    """(the shared twin of ``m``, its SQNR in dB against ``m``'s weight)."""
    w = m.weight.detach().float()
    r, n = rows_shape(tuple(w.shape), config.scope, config.group_size)
    rows = w.reshape(r, n)
    zeros = rows == 0
    mask = ~zeros if bool(zeros.any()) else None
    share = {"kind": config.kind, "scope": config.scope, "group_size": config.group_size, "k": config.k}
    if isinstance(config, KMeans):
        weights = None if importance is None else importance.reshape(r, n)
        centroids, idx = km.kmeans_1d(rows, config.k, weights=weights, init=config.init, iters=config.iters,
                                      mask=mask)
        row_scale = None
        if config.snap == "int8":
            share["snap"] = "int8"
            centroids, idx, row_scale = snap_int8(rows, centroids, idx, w.shape[0], mask)
        shared = twin.build(m, share, idx, codebook=centroids, mask=mask)
        if row_scale is not None:
            shared.register_buffer("codebook_scale", row_scale.clone())
    else:
        if isinstance(config, Binary):
            scale, idx = km.binary_fit(rows, mask)
            levels = torch.tensor([-1.0, 1.0])
        elif isinstance(config, Ternary):
            scale, idx = km.ternary_fit(rows, config.threshold, mask)
            levels = torch.tensor([-1.0, 0.0, 1.0])
        elif isinstance(config, PowerOfTwo):
            scale, levels, idx = km.power_of_two_fit(rows, config.bits, mask)
        else:
            raise ConfigError(f"{type(config).__name__} is not a weight-sharing config")
        share["k"] = int(levels.numel())
        shared = twin.build(m, share, idx, scale=scale, levels=levels, mask=mask)
    return shared, float(km.sqnr_db(w, shared.weight.detach()))


def snap_int8(rows: torch.Tensor, centroids: torch.Tensor, idx: torch.Tensor, channels: int,
              mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centroids moved onto the symmetric INT8 grid of their output channel (scale = max |value| / 127, the
    grid ``Int8Static`` gives a per-channel weight), members re-assigned to them, each row's scale (R, 1))."""
    r = rows.shape[0]
    used = centroids.gather(1, idx)
    if mask is not None:
        used = used * mask
    tiny = torch.finfo(torch.float32).tiny
    if r == 1:      # one codebook for the whole layer: one grid (quantize it per tensor to keep it exact)
        row_scale = (used.abs().amax() / 127).clamp_min(tiny).reshape(1, 1)
    else:           # rows of one channel are consecutive (scope 'channel' or 'group')
        per_channel = (used.reshape(channels, -1).abs().amax(1) / 127).clamp_min(tiny)
        row_scale = per_channel.repeat_interleave(r // channels)[:, None]
    snapped = torch.clamp(torch.round(centroids / row_scale), -127, 127) * row_scale
    snapped, _ = torch.sort(snapped, dim=1)
    return snapped, km.assign(rows, snapped), row_scale


def snap_codebooks(model: nn.Module) -> nn.Module:
    """Put every ``snap='int8'`` codebook back on its INT8 grid (after fine-tuning moved it); in place."""
    with torch.no_grad():
        for m in model.modules():
            scale = getattr(m, "codebook_scale", None)
            if isinstance(m, SharedTwin) and scale is not None:
                m.codebook.copy_(torch.clamp(torch.round(m.codebook / scale), -127, 127) * scale)
    return model


def _importance(model: nn.Module, chosen, data) -> dict[str, torch.Tensor]:
    """Layer name -> each weight's importance: the mean square of the input it multiplies (diag of X^T X)."""
    from smallify.data import first_batches, run_hooked

    batches = first_batches(data, 512)
    if not batches:
        return {}
    sums: dict[str, list] = {}

    def hook_for(name, m):
        def hook(module, args, output):
            x = args[0].detach().float()
            if isinstance(m, nn.Linear):
                x2 = x.reshape(-1, x.shape[-1]).pow(2)
            elif isinstance(m, (nn.Conv2d, nn.Conv1d)) and m.groups == 1:
                x2 = x.movedim(1, -1).reshape(-1, x.shape[1]).pow(2)
            else:
                return
            s = sums.setdefault(name, [0.0, 0])
            s[0] = s[0] + x2.sum(0)
            s[1] += x2.shape[0]
        return hook

    modules = {n: m for n, m, _ in chosen}
    run_hooked(model, batches, {n: hook_for(n, m) for n, m in modules.items()}, modules)
    out = {}
    for name, (total, count) in sums.items():
        w = modules[name].weight
        per_input = (total / max(count, 1)).clamp_min(1e-12)      # (in,)
        shape = [1, -1] + [1] * (w.ndim - 2)
        out[name] = (per_input.reshape(shape) / per_input.mean()).expand_as(w).contiguous()
    return out
