"""The weight-sharing configs: k-means codebooks and their structured cases (binary, ternary, power of two)."""
from __future__ import annotations

import dataclasses
import numbers

from smallify.config import Config, check_choice
from smallify.errors import ConfigError

SCOPES = ("layer", "channel", "group")
INITS = ("linear", "density", "kmeans++")
SNAPS = (None, "int8")


def _int(name: str, value, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is not supported; accepted: {what}")
    return int(value)


@dataclasses.dataclass
class Share(Config):
    """What every weight-sharing config has: ``scope`` (one codebook per 'layer', per output 'channel', or per
    'group' of ``group_size`` consecutive weights of one output channel) and ``skip`` (fnmatch patterns of
    Conv2d/Linear layer names left in float: e.g. the first and last layers)."""

    scope: str = "layer"
    group_size: int | None = None
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        check_choice("scope", self.scope, SCOPES)
        if self.scope == "group":
            if self.group_size is None:
                raise ConfigError("scope='group' needs group_size= (weights per codebook along a channel, e.g. 64)")
            self.group_size = _int("group_size", self.group_size, 2, 2**31, "an integer >= 2, e.g. 64")
        elif self.group_size is not None:
            raise ConfigError(f"group_size={self.group_size!r} applies to scope='group' only; scope is {self.scope!r}")
        self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)

    @property
    def k(self) -> int:
        raise NotImplementedError


@dataclasses.dataclass
class KMeans(Share):
    """k-means codebooks (Deep Compression): each scope's weights take one of ``clusters`` shared values (or
    2^``bits``), found by 1-D k-means from ``init`` ('linear': evenly spaced between min and max, 'density':
    equal-probability quantiles, 'kmeans++'). ``weighted``: with ``data``, each weight counts by its input's
    mean square (the diagonal of the layer's Hessian), so that the centroids sit where the output error is
    smallest. ``snap='int8'``: the codebook lies on the symmetric per-channel INT8 grid (k-means in the
    quantized domain: ``quantize(..., Int8Static())`` then keeps exactly these values and runs integer
    kernels). Pruned weights (exact zeros) stay zero and are not clustered."""

    kind = "kmeans"
    verbs = ("cluster",)
    clusters: int | None = None
    bits: int | None = None
    init: str = "linear"
    weighted: bool = True
    iters: int = 30
    snap: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.clusters is not None and self.bits is not None:
            raise ConfigError(f"give clusters= or bits=, not both (clusters={self.clusters!r}, bits={self.bits!r})")
        if self.bits is not None:
            self.bits = _int("bits", self.bits, 1, 8, "an integer 1..8 (2..256 clusters)")
        elif self.clusters is None:
            self.clusters = 16
        if self.clusters is not None:
            self.clusters = _int("clusters", self.clusters, 2, 256, "an integer 2..256")
        check_choice("init", self.init, INITS)
        check_choice("snap", self.snap, SNAPS)
        self.iters = _int("iters", self.iters, 1, 10_000, "an integer >= 1")

    @property
    def k(self) -> int:
        return self.clusters if self.clusters is not None else 2 ** self.bits

    def describe(self) -> str:
        return f"k-means {self.k} per {self.scope}" + (" on the INT8 grid" if self.snap else "")


@dataclasses.dataclass
class Binary(Share):
    """Binary weights {-a, +a} (BWN: a = mean |w| of the scope, the closed-form optimum); 1-bit indices."""

    kind = "binary"
    verbs = ("cluster",)
    scope: str = "channel"
    levels = (-1.0, 1.0)

    @property
    def k(self) -> int:
        return 2

    def describe(self) -> str:
        return f"binary per {self.scope}"


@dataclasses.dataclass
class Ternary(Share):
    """Ternary weights {-a, 0, +a} (TWN: weights below ``threshold`` x mean |w| become 0, a = mean |w| of the
    rest); 2-bit indices."""

    kind = "ternary"
    verbs = ("cluster",)
    scope: str = "channel"
    threshold: float = 0.7
    levels = (-1.0, 0.0, 1.0)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) or not 0 < self.threshold < 2:
            raise ConfigError(f"threshold={self.threshold!r} is not supported; accepted: a number in (0, 2), e.g. 0.7")

    @property
    def k(self) -> int:
        return 3

    def describe(self) -> str:
        return f"ternary per {self.scope}"


@dataclasses.dataclass
class PowerOfTwo(Share):
    """Power-of-two weights (logarithmic quantization): each scope's weights take one of 2^``bits`` - 1 levels,
    0 and ±scale·2^-j for j = 0 .. 2^(bits-1) - 2, with a power-of-two scale per scope, so that every weight is
    0 or ±2^e (a multiplication becomes a shift). Fine-tuning learns the scale (one multiply per output channel,
    the levels stay powers of two)."""

    kind = "power_of_two"
    verbs = ("cluster",)
    scope: str = "channel"
    bits: int = 3

    def __post_init__(self):
        super().__post_init__()
        self.bits = _int("bits", self.bits, 2, 8, "an integer 2..8")

    @property
    def k(self) -> int:
        return 2 ** self.bits - 1

    def describe(self) -> str:
        return f"power of two ({self.bits} bits) per {self.scope}"
