"""Configs of the LLM weight-only methods: RTN, DataFree (an MSE grid search with least-squares refits, HQQ
class), GPTQ (optionally on AWQ-scaled weights) and AWQ. One grid for all: ``bits`` 2..8, groups of
``group_size`` consecutive input channels (None: one scale per output channel), ``sym`` (signed grid
[-2^(b-1), 2^(b-1)-1], zero point 0: llama.cpp's Q4_0/Q8_0 layout) or asymmetric (unsigned [0, 2^b-1] with a
zero point per group: Q4_1's layout)."""
from __future__ import annotations

import dataclasses
import numbers

from smallify.config import Config
from smallify.errors import ConfigError
from smallify.quant.config import check_bits, first_match, patterns
from smallify.quant.modules import WeightSpec
from smallify.quant.primitives import IntFormat


def grid_format(bits: int, sym: bool) -> IntFormat:
    """The integer grid of the LLM methods: signed full range with zero point 0 (sym), unsigned with a zero
    point (asym). Both are stored with their zero points, so the container and the writers need no new case."""
    return IntFormat(bits, signed=sym, symmetric=False)


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not supported; accepted: an integer >= {minimum}")


@dataclasses.dataclass
class LLMWeightOnly(Config):
    """The fields every LLM method shares. ``lm_head``: quantize the output projection too (its own grid:
    ``lm_head_bits``; default kept float, as tied embeddings are); ``skip``: fnmatch patterns of Linear names
    kept float. Calibration (data-driven methods): ``samples`` windows of ``seq_len`` tokens."""

    kind = "llm_weight_only"
    verbs = ("quantize",)
    bits: int = 4
    group_size: int | None = 64
    sym: bool = False
    lm_head: bool = False
    lm_head_bits: int = 8
    skip: tuple[str, ...] = ()
    samples: int = 32
    seq_len: int = 512
    uses_data = False
    method = "llm"

    def __post_init__(self):
        check_bits("bits", self.bits)
        check_bits("lm_head_bits", self.lm_head_bits)
        if self.group_size is not None:
            _positive_int("group_size", self.group_size, 2)
        if not isinstance(self.sym, bool) or not isinstance(self.lm_head, bool):
            raise ConfigError("sym and lm_head take True or False")
        self.skip = patterns("skip", self.skip)
        _positive_int("samples", self.samples)
        _positive_int("seq_len", self.seq_len, 8)

    def skip_pattern(self, *names: str) -> str | None:
        return first_match(self.skip, names)

    @property
    def fmt(self) -> IntFormat:
        return grid_format(self.bits, self.sym)

    def spec(self, in_features: int, head: bool = False) -> tuple[WeightSpec, int | None]:
        """The grid of a Linear with ``in_features`` inputs, and the group size used: ``group_size`` when it
        divides ``in_features``, else the largest group size below it that does (reported), or per channel."""
        group = self.group_size
        if group is not None and in_features % group:
            group = next((g for g in range(group - 1, 1, -1) if in_features % g == 0), None)
        fmt = grid_format(self.lm_head_bits if head else self.bits, self.sym)
        return WeightSpec(fmt, True, group), group

    def describe(self) -> str:
        gran = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.method} {self.bits}-bit {gran} {'sym' if self.sym else 'asym'}"


@dataclasses.dataclass
class RTN(LLMWeightOnly):
    """Round to nearest on the min-max grid of each group: the baseline every other method is judged against."""

    kind = "llm_rtn"
    method = "rtn"


@dataclasses.dataclass
class DataFree(LLMWeightOnly):
    """No calibration data: per group, the grid's range is searched (``grid`` shrink factors of the min-max
    range, each side) for the least squared weight error, then scale and zero point are refitted by least
    squares on the rounded integers ``refits`` times (the k-quant idea); the best seen is kept.
    ``importance``: 'magnitude' weighs each weight's error by |w| + the group's RMS (llama.cpp's k-quant
    weighting), so that the large weights an LLM depends on are not clipped; None: plain squared error."""

    kind = "llm_datafree"
    method = "datafree"
    grid: int = 20
    refits: int = 4
    importance: str | None = "magnitude"
    generated: int = 0

    def __post_init__(self):
        super().__post_init__()
        _positive_int("grid", self.grid)
        _positive_int("refits", self.refits, 0)
        _positive_int("generated", self.generated, 0)
        if self.importance not in (None, "magnitude"):
            raise ConfigError(f"importance={self.importance!r} is not supported; accepted: 'magnitude' or None")


@dataclasses.dataclass
class GPTQ(LLMWeightOnly):
    """GPTQ (Frantar et al. 2022): per Linear, the Hessian H = 2 X^T X of its calibration inputs; columns are
    quantized ``block_size`` at a time and each column's rounding error is spread over the columns not yet
    quantized through the inverse Hessian's Cholesky factor. ``act_order``: columns in descending order of
    diag(H) (groups stay contiguous: a group's grid is fitted when its first column comes up); ``damp``: the
    fraction of the mean diagonal added to H. Each decoder block is calibrated on the outputs of the already
    quantized blocks before it. ``awq=True``: AWQ's scales first (AWQ + GPTQ, as NNCF and llm-compressor
    offer); ``mse``: group grids from DataFree's range search instead of min-max."""

    kind = "llm_gptq"
    method = "gptq"
    uses_data = True
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    awq: bool = False
    mse: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.damp, numbers.Real) or isinstance(self.damp, bool) or not 0 < float(self.damp) < 1:
            raise ConfigError(f"damp={self.damp!r} is not supported; accepted: a number in (0, 1), e.g. 0.01")
        _positive_int("block_size", self.block_size)
        for name in ("act_order", "awq", "mse"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} takes True or False")


@dataclasses.dataclass
class AWQ(LLMWeightOnly):
    """AWQ (Lin et al. 2023): per group of Linears that read the same input (q/k/v, gate/up), input-channel
    scales s = mean|x|^alpha (alpha searched on ``grid`` points in [0, 1]) multiply the weights and divide the
    op that produces the input (a norm, or a Linear whose outputs reach the group linearly: found by a numeric
    probe, no architecture list); then per group of weights a clipping ratio is searched (``clip``) for the
    least output error. Groups without such a producer keep s = 1 and get the clipping search only."""

    kind = "llm_awq"
    method = "awq"
    uses_data = True
    grid: int = 20
    clip: bool = True

    def __post_init__(self):
        super().__post_init__()
        _positive_int("grid", self.grid, 2)
        if not isinstance(self.clip, bool):
            raise ConfigError("clip takes True or False")


METHODS = {"rtn": RTN, "datafree": DataFree, "hqq": DataFree, "gptq": GPTQ, "awq": AWQ}
