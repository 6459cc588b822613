"""Range observers: they watch calibration tensors and return a (min, max) range to quantize.

``MinMaxObserver`` keeps running extremes (per tensor or per channel). ``HistogramObserver`` keeps a
histogram whose range grows as data arrives and reads a percentile range off it.
"""
from __future__ import annotations

import torch

from smallify.errors import ConfigError, DataError


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise DataError(f"calibration data produced NaN or Inf at {where}; check the inputs and the model")


class MinMaxObserver:
    """Running min and max; ``axis`` gives per-channel extremes along that axis."""

    def __init__(self, axis: int | None = None, name: str = "tensor"):
        self.axis, self.name = axis, name
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        _check_finite(x, self.name)
        if x.numel() == 0:
            return
        if self.axis is None:
            lo, hi = x.min(), x.max()
        else:
            flat = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
            lo, hi = flat.min(1).values, flat.max(1).values
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val is None:
            raise DataError(f"no calibration data reached {self.name}")
        return self.min_val, self.max_val


class HistogramObserver:
    """A ``bins``-bin histogram of all values seen (per tensor), with a range that grows to fit new data."""

    def __init__(self, bins: int = 2048, name: str = "tensor"):
        self.bins, self.name = bins, name
        self.hist: torch.Tensor | None = None
        self.lo = self.hi = 0.0
        self.min_val = self.max_val = 0.0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        _check_finite(x, self.name)
        if x.numel() == 0:
            return
        xmin, xmax = float(x.min()), float(x.max())
        if self.hist is None:
            self.min_val, self.max_val = xmin, xmax
            self.lo, self.hi = xmin, max(xmax, xmin + 1e-8)
            self.hist = torch.histc(x, self.bins, self.lo, self.hi).double()
            return
        self.min_val, self.max_val = min(self.min_val, xmin), max(self.max_val, xmax)
        if xmin < self.lo or xmax > self.hi:
            self._grow(min(xmin, self.lo), max(xmax, self.hi))
        self.hist += torch.histc(x, self.bins, self.lo, self.hi).double()

    def _grow(self, lo: float, hi: float) -> None:
        """Re-bin the counts onto a wider range (each old bin's count goes to the new bin of its centre)."""
        width = (self.hi - self.lo) / self.bins
        centres = self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
        new_width = (hi - lo) / self.bins
        idx = ((centres - lo) / new_width).long().clamp(0, self.bins - 1)
        new = torch.zeros(self.bins, dtype=torch.float64)
        new.index_add_(0, idx, self.hist)
        self.hist, self.lo, self.hi = new, lo, hi

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def percentile_range(self, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The range holding the central ``percentile`` % of the values (two-sided)."""
        if self.hist is None:
            raise DataError(f"no calibration data reached {self.name}")
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile={percentile!r} must lie in (50, 100]")
        if percentile == 100.0:
            return torch.tensor(self.min_val), torch.tensor(self.max_val)
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        tail = (100.0 - percentile) / 200.0
        edges = self.edges()
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        lo = max(float(edges[lo_bin]), self.min_val)
        hi = min(float(edges[min(hi_bin + 1, self.bins)]), self.max_val)
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


def make_observer(method: str, percentile: float = 99.99, name: str = "tensor"):
    """An activation observer for calibration ``method``; ``range_of(obs)`` reads its range."""
    if method == "minmax":
        return MinMaxObserver(name=name)
    if method == "percentile":
        obs = HistogramObserver(name=name)
        obs.percentile = percentile
        return obs
    raise ConfigError(f"calibration={method!r} is not supported; accepted: 'minmax', 'percentile'")


def range_of(obs) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(obs, HistogramObserver):
        return obs.percentile_range(obs.percentile)
    return obs.range()
