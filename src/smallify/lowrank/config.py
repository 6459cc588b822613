"""``LowRank``: which layers to decompose, how, at which rank, and where it must be faster."""
from __future__ import annotations

import dataclasses
import numbers

from smallify.config import Config, check_choice
from smallify.errors import ConfigError
from smallify.lowrank.factor import METHODS
from smallify.lowrank.speed import RUNTIMES


def _fraction(name: str, value, closed_top: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0 \
        and (value <= 1 if closed_top else value < 1)
    if not ok:
        raise ConfigError(f"{name}={value!r} is not supported; accepted: a number in (0, 1{']' if closed_top else ')'}")
    return float(value)


@dataclasses.dataclass
class LowRank(Config):
    """Low-rank decomposition of Linear and Conv2d layers into smaller plain layers.

    ``method``: 'svd' (Linear and 1x1 conv: two layers of rank r; with ``data``, activation-aware: the input
    covariance whitens the SVD), 'spatial' (k x k conv -> k x 1 then 1 x k), 'tucker' (k x k conv -> 1x1, core,
    1x1: Tucker-2), 'separable' (k x k conv -> depthwise k x k + pointwise 1x1, m filters per channel), or
    'auto' (svd for Linear and 1x1, and for k x k convs whichever of spatial and tucker costs least at the
    error the rank choice allows).

    The rank, one of: ``rank`` (an integer: that rank in every layer, for tucker both ranks, for separable the
    filters per channel; a fraction in (0, 1): that share of each layer's full rank; 'vbmf': Tucker ranks by
    variational Bayesian matrix factorisation), ``energy`` (the smallest rank whose relative output error on
    ``data`` - weight-space error without data - is at most 1 - energy), or one global budget: ``macs`` /
    ``params`` (the kept share of the whole model's MACs / parameters), spread over the layers by least error
    per saved MAC. Ranks are multiples of ``round_to``. Default: energy=0.95. The statistics come from the first
    256 samples of ``data``.

    ``runtime`` ('onnxruntime', 'openvino' or None): each decomposed layer is timed against the original on
    its real input shape at ``batch`` with ``threads`` (cached per shape) and kept only when at least
    ``min_speedup`` times faster; None: no timing. ``aware`` (with data): errors are output errors on the data,
    SVD is whitened by the input covariance and every other form's last part is re-solved by least squares on
    the layer's inputs; False: weight-space errors and fits (the data then only gives shapes and MACs). ``layers``: only these (fnmatch patterns; a named layer that cannot be
    decomposed is an error), ``skip``: never these."""

    kind = "lowrank"
    verbs = ("decompose",)
    method: str = "auto"
    rank: int | float | str | None = None
    energy: float | None = None
    macs: float | None = None
    params: float | None = None
    round_to: int = 8
    layers: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    runtime: str | None = "onnxruntime"
    batch: int = 1
    threads: int = 2
    min_speedup: float = 1.0
    aware: bool = True
    damp: float = 0.01

    def __post_init__(self):
        check_choice("method", self.method, ("auto",) + METHODS)
        given = [n for n in ("rank", "energy", "macs", "params") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give one of rank=, energy=, macs=, params=; got {', '.join(given)}")
        if not given:
            self.energy = 0.95
        if self.rank is not None:
            r = self.rank
            if isinstance(r, str):
                if r != "vbmf" or self.method not in ("tucker", "auto"):
                    raise ConfigError(f"rank={r!r} is not supported; accepted: an integer >= 1, a fraction in (0, 1), "
                                      "or 'vbmf' (method 'tucker' or 'auto')")
            elif isinstance(r, bool) or not isinstance(r, numbers.Real) or r <= 0 or \
                    (not isinstance(r, numbers.Integral) and r >= 1):
                raise ConfigError(f"rank={r!r} is not supported; accepted: an integer >= 1 (below each layer's full "
                                  "rank), a fraction in (0, 1), or 'vbmf'")
            elif isinstance(r, numbers.Integral):
                self.rank = int(r)
            else:
                self.rank = float(r)
        if self.energy is not None:
            self.energy = _fraction("energy", self.energy, closed_top=True)
        for name in ("macs", "params"):
            if getattr(self, name) is not None:
                setattr(self, name, _fraction(name, getattr(self, name), closed_top=False))
        for name, lo in (("round_to", 1), ("batch", 1), ("threads", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ConfigError(f"{name}={v!r} is not supported; accepted: an integer >= {lo}")
        check_choice("runtime", self.runtime, RUNTIMES + (None,))
        if isinstance(self.min_speedup, bool) or not isinstance(self.min_speedup, numbers.Real) or self.min_speedup <= 0:
            raise ConfigError(f"min_speedup={self.min_speedup!r} is not supported; accepted: a number > 0 (1.0: "
                              "faster at all)")
        if not isinstance(self.aware, bool):
            raise ConfigError(f"aware={self.aware!r} is not supported; accepted: true or false")
        if isinstance(self.damp, bool) or not isinstance(self.damp, numbers.Real) or not 0 <= self.damp < 1:
            raise ConfigError(f"damp={self.damp!r} is not supported; accepted: a number in [0, 1)")
        self.layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)

    def describe(self) -> str:
        how = next(f"{n}={getattr(self, n)}" for n in ("rank", "energy", "macs", "params") if getattr(self, n) is not None)
        return f"low-rank {self.method}, {how}"
