"""Range observers: they watch calibration tensors and return a (min, max) range to quantize.

``MinMaxObserver`` keeps running extremes (per tensor or per channel). ``HistogramObserver`` keeps a
histogram whose range grows as data arrives and reads a percentile range off it.
"""
from __future__ import annotations

import math

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

    SAMPLE = 2 ** 17

    def __init__(self, bins: int = 2048, name: str = "tensor", method: str = "percentile",
                 percentile: float = 99.99, fmt=None):
        """``method`` ('percentile', 'entropy' or 'mse') and ``fmt`` (the target integer format, for 'entropy'
        and 'mse') decide what ``range_of`` reads off the histogram."""
        self.bins, self.name = bins, name
        self.method, self.percentile, self.fmt = method, percentile, fmt
        self.sample = torch.empty(0)
        self.seen = 0
        self.zeros = 0.0   # exact zeros (ReLU outputs, padding): exact under every range, so left out of the KL
        self._gen = torch.Generator().manual_seed(0)
        self.hist: torch.Tensor | None = None
        self.lo = self.hi = 0.0
        self.min_val = self.max_val = 0.0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        _check_finite(x, self.name)
        if x.numel() == 0:
            return
        self._keep_sample(x)
        self.zeros += float((x == 0).sum())
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

    def _keep_sample(self, x: torch.Tensor) -> None:
        """Keep a uniform random sample of everything seen (each value kept with probability SAMPLE / seen)."""
        self.seen += x.numel()
        pool = torch.cat([self.sample, x])
        if pool.numel() > self.SAMPLE:
            # weights: old sample stands for (seen - n) values, new values for themselves
            w = torch.cat([torch.full((self.sample.numel(),), (self.seen - x.numel()) / max(self.sample.numel(), 1)),
                           torch.ones(x.numel())])
            pick = torch.multinomial(w, self.SAMPLE, replacement=False, generator=self._gen)
            pool = pool[pick]
        self.sample = pool

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


    def _alphas(self, min_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipping ranges [a*min, a*max] for 100 values of a, spaced geometrically in [min_fraction, 1]."""
        if self.hist is None:
            raise DataError(f"no calibration data reached {self.name}")
        alphas = torch.logspace(math.log10(min_fraction), 0.0, 100, dtype=torch.float64)
        return alphas * min(self.min_val, 0.0), alphas * max(self.max_val, 0.0)

    def mse_range(self, fmt) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range that minimizes the mean squared quantization error of the values seen (evaluated on
        a uniform random sample of up to 2**17 of them)."""
        from smallify.quant.primitives import compute_qparams

        lo, hi = self._alphas(1e-3)
        x = self.sample.double()[None, :]
        scale, zero = compute_qparams(lo.float(), hi.float(), fmt)
        s, z = scale.double()[:, None], zero.double()[:, None]
        err = torch.stack([(((torch.clamp(torch.round(x / s[i]) + z[i], fmt.qmin, fmt.qmax) - z[i]) * s[i] - x) ** 2).mean()
                           for i in range(len(lo))])
        best = int(torch.argmin(err))
        return lo[best].float(), hi[best].float()

    def entropy_range(self, fmt) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range whose quantized distribution is closest (KL divergence) to the observed one, as in
        TensorRT's entropy calibrator: the reference P folds the values beyond the range into its edge bins; the
        candidate Q spreads each quantization level's in-range mass over the non-empty bins it covers."""
        from smallify.quant.primitives import compute_qparams

        levels = fmt.qmax - fmt.qmin + 1
        lo, hi = self._alphas(min(1.0, levels / self.bins))
        edges = self.edges()
        centres = (edges[:-1] + edges[1:]) / 2
        scale, zero = compute_qparams(lo.float(), hi.float(), fmt)
        hist = self.hist.clone()
        zero_bin = min(max(int((0.0 - self.lo) / ((self.hi - self.lo) / self.bins)), 0), self.bins - 1)
        hist[zero_bin] = max(float(hist[zero_bin]) - self.zeros, 0.0)
        best, best_kl = len(lo) - 1, float("inf")
        for k in range(len(lo)):
            idx = torch.nonzero((centres >= lo[k]) & (centres <= hi[k])).flatten()
            if len(idx) < 2:
                continue
            inside = hist[idx]
            p = inside.clone()
            p[0] += hist[: idx[0]].sum()
            p[-1] += hist[idx[-1] + 1:].sum()
            level = (torch.round(centres[idx] / float(scale[k])) + int(zero[k])).clamp(fmt.qmin, fmt.qmax).long() - fmt.qmin
            nonzero = (inside > 0).double()
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, level, inside)
            count = torch.zeros(levels, dtype=torch.float64).index_add_(0, level, nonzero)
            q = torch.where(inside > 0, mass[level] / count[level].clamp_min(1), torch.zeros_like(inside))
            pn, qn = p / p.sum(), q / q.sum().clamp_min(1e-300)
            m = pn > 0
            kl = float((pn[m] * torch.log(pn[m] / qn[m].clamp_min(1e-300))).sum())
            if kl < best_kl - 1e-12:
                best, best_kl = k, kl
        return lo[best].float(), hi[best].float()


CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")


def make_observer(method: str, percentile: float = 99.99, name: str = "tensor", fmt=None):
    """An activation observer for calibration ``method``; ``range_of(obs)`` reads its range.
    ``fmt`` (the target integer format) matters to 'entropy' and 'mse'."""
    if method == "minmax":
        return MinMaxObserver(name=name)
    if method in CALIBRATIONS:
        return HistogramObserver(name=name, method=method, percentile=percentile, fmt=fmt)
    raise ConfigError(f"calibration={method!r} is not supported; accepted: {', '.join(map(repr, CALIBRATIONS))}")


def range_of(obs) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(obs, HistogramObserver):
        if obs.method == "percentile":
            return obs.percentile_range(obs.percentile)
        from smallify.quant.primitives import UINT8_ACT

        fmt = obs.fmt or UINT8_ACT
        return obs.mse_range(fmt) if obs.method == "mse" else obs.entropy_range(fmt)
    return obs.range()
