"""Unstructured magnitude pruning: per layer or global, N:M patterns (2:4), one-shot or ramped during
fine-tuning (the cubic schedule of Zhu & Gupta, 2017). Masks are torch parametrizations, so they hold while
the model trains; ``finalize`` folds them into the weights. ``smallify.save`` then stores the zeros compactly
(a bit mask and the surviving values), so the file shrinks with the sparsity.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from smallify.config import Config, check_config
from smallify.errors import ConfigError, ModelError


@dataclasses.dataclass
class Unstructured(Config):
    """``sparsity``: fraction of weights zeroed, in [0, 1), per layer (``scope='layer'``) or by one global
    magnitude threshold (``scope='global'``); ``pattern`` 'N:M' (e.g. '2:4': in every M consecutive input
    weights, N are kept) instead; ``ignore``: fnmatch patterns of layers left dense."""

    kind = "unstructured"
    verbs = ("sparsify", "prune_gradually")
    sparsity: float = 0.5
    scope: str = "global"
    pattern: str | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity={self.sparsity!r} is not supported; accepted: a number in [0, 1)")
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope={self.scope!r} is not supported; accepted: 'layer', 'global'")
        if self.pattern is not None:
            self.nm  # validates
        self.ignore = (self.ignore,) if isinstance(self.ignore, str) else tuple(self.ignore)

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        try:
            n, m = (int(v) for v in str(self.pattern).split(":"))
        except ValueError:
            n = m = 0
        if not 0 < n < m:
            raise ConfigError(f"pattern={self.pattern!r} is not supported; accepted: 'N:M' with 0 < N < M, e.g. '2:4'")
        return n, m


class WeightMask(nn.Module):
    """A parametrization: weight = original * mask."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("mask", torch.ones(shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def _layers(model: nn.Module, ignore) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and not any(fnmatch.fnmatchcase(n, p) for p in ignore)]


def _original(m: nn.Module) -> torch.Tensor:
    return m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input channels."""
    wt = w.detach().abs().movedim(1, -1) if w.ndim == 4 else w.detach().abs()
    if wt.shape[-1] % m:
        raise ConfigError(f"an {n}:{m} pattern needs input channels divisible by {m}; a layer has {wt.shape[-1]}")
    blocks = wt.reshape(-1, m)
    keep = torch.zeros_like(blocks)
    keep.scatter_(1, torch.topk(blocks, n, dim=1).indices, 1.0)
    keep = keep.reshape(wt.shape)
    return keep.movedim(-1, 1) if w.ndim == 4 else keep


def set_masks(model: nn.Module, config: Unstructured, sparsity: float | None = None) -> None:
    """(Re)compute every mask from the current weights' magnitudes at ``sparsity`` (default config.sparsity)."""
    sparsity = config.sparsity if sparsity is None else sparsity
    layers = [(n, m) for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]
    if config.nm is not None:
        for _, m in layers:
            m.parametrizations.weight[0].mask.copy_(nm_mask(_original(m), *config.nm))
        return
    if config.scope == "global":
        scores = torch.cat([_original(m).detach().abs().flatten() for _, m in layers])
        k = int(sparsity * scores.numel())
        threshold = torch.kthvalue(scores, k).values if k > 0 else torch.tensor(-1.0)
        for _, m in layers:
            m.parametrizations.weight[0].mask.copy_((_original(m).detach().abs() > threshold).float())
    else:
        for _, m in layers:
            w = _original(m).detach().abs()
            k = int(sparsity * w.numel())
            threshold = torch.kthvalue(w.flatten(), k).values if k > 0 else torch.tensor(-1.0)
            m.parametrizations.weight[0].mask.copy_((w > threshold).float())


def sparsify(model: nn.Module, config: Unstructured | None = None, inplace: bool = False) -> nn.Module:
    """Attach magnitude masks to every Conv2d/Linear weight (not ignored) at ``config.sparsity``."""
    config = check_config(config, Unstructured, "sparsify") or Unstructured()
    model = model if inplace else copy.deepcopy(model)
    layers = _layers(model, config.ignore)
    if not layers:
        raise ModelError("no Conv2d or Linear layer to prune (all ignored?)")
    if config.nm is not None:
        n_, m_ = config.nm
        for name, m in layers:
            ch = m.weight.shape[1]
            if ch % m_:
                raise ConfigError(f"layer {name!r} has {ch} input channels, not divisible by {m_} for the "
                                  f"{config.pattern} pattern; add it to ignore")
    for _, m in layers:
        if not parametrize.is_parametrized(m, "weight"):
            parametrize.register_parametrization(m, "weight", WeightMask(m.weight.shape))
    set_masks(model, config)
    model.sparsity_config = config
    return model


def cubic_sparsity(step: int, total: int, final: float, ramp: float = 0.75) -> float:
    """Zhu & Gupta's schedule: final * (1 - (1 - t)^3), t the fraction of the ramp done; then held."""
    t = min(1.0, step / max(1, int(total * ramp)))
    return final * (1 - (1 - t) ** 3)


MIN_UPDATES = 4          # mask updates over the ramp below which a "gradual" schedule is one-shot pruning


def schedule_interval(total: int, update_every: int | None = None, ramp: float = 0.75) -> int:
    """Steps between mask updates for a run of ``total`` steps: about 16 updates over the ramp (the first
    ``ramp`` of the run; the rest trains at the final sparsity to recover) unless ``update_every`` is given.
    Refuses a schedule that would update the masks fewer than ``MIN_UPDATES`` times during the ramp: that is
    one-shot pruning with little or no recovery, whatever the name says."""
    ramp_steps = int(total * ramp)
    if ramp_steps < MIN_UPDATES:
        raise ConfigError(f"a gradual sparsity schedule needs at least {math.ceil(MIN_UPDATES / ramp)} training "
                          f"steps; this run has {total}: train longer, use a smaller batch_size, or prune "
                          "one-shot with smallify.sparsify and then fine-tune")
    if update_every is None:
        return max(1, ramp_steps // 16)
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ConfigError(f"update_every={update_every!r} is not supported; accepted: an integer >= 1, or None "
                          "(derived from the run's length)")
    if ramp_steps // update_every < MIN_UPDATES:
        raise ConfigError(f"update_every={update_every} updates the masks {ramp_steps // update_every} time(s) "
                          f"during the {ramp_steps}-step ramp of this {total}-step run (one-shot pruning, no "
                          f"recovery); accepted: at most {ramp_steps // MIN_UPDATES}, or None (derived from "
                          "the run's length)")
    return update_every


def prune_gradually(model: nn.Module, data, config: Unstructured | None = None, train_config=None, loss_fn=None,
                    eval_fn=None, checkpoint=None, progress: bool = True, update_every: int | None = None) -> nn.Module:
    """Fine-tune ``model`` on ``data`` (``TrainData``) while its sparsity ramps from 0 to ``config.sparsity``
    (default ``Unstructured()``) over the first 3/4 of the run (cubic schedule), the masks recomputed every
    ``update_every`` steps (default: derived from the run's length, about 16 updates; see
    ``schedule_interval``), then held while the model recovers; ``train_config``, ``loss_fn``, ``eval_fn``,
    ``checkpoint``: as in ``smallify.train``. Returns the model with its masks folded in (``finalize``),
    ``train_history`` and ``sparsity_schedule`` set. The order of the releases before (config before data)
    still works for one release, with a DeprecationWarning."""
    from smallify.train import TrainConfig, train

    if isinstance(data, Config):       # prune_gradually(model, config, data, ...): the order before
        warnings.warn("prune_gradually(model, config, data) is deprecated; pass data first, as in train, distill "
                      "and qat: prune_gradually(model, data, config)", DeprecationWarning, stacklevel=2)
        data, config = config, data
    config = check_config(config, Unstructured, "prune_gradually") or Unstructured()
    check_config(train_config, TrainConfig, "prune_gradually", "train_config")
    model = sparsify(model, dataclasses.replace(config, sparsity=0.0) if config.nm is None else config)
    model.sparsity_config = config
    schedule: dict = {}

    def on_step(step: int, total: int) -> None:
        if config.nm is not None:
            return
        if not schedule:
            every = schedule_interval(total, update_every)
            schedule.update(total_steps=total, update_every=every, ramp_steps=int(total * 0.75))
        if step % schedule["update_every"] == 0 or step == total:
            set_masks(model, config, cubic_sparsity(step, total, config.sparsity))

    result = train(model, data, train_config, loss_fn, eval_fn, checkpoint, progress, on_step=on_step)
    finalize(model)
    model.train_history, model.report = result.history, result
    model.sparsity_schedule = schedule
    return model


def finalize(model: nn.Module) -> nn.Module:
    """Fold the masks into the weights (zeros stay zeros) and drop the parametrizations."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zeros over every Conv2d/Linear weight."""
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return float(sum((w == 0).sum() for w in ws) / sum(w.numel() for w in ws))
