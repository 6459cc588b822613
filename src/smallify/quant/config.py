"""Quantization method configs."""
from __future__ import annotations

import dataclasses
import fnmatch
import numbers

from smallify.config import Config, check_choice
from smallify.errors import ConfigError
from smallify.quant.placement import SCHEMES
from smallify.quant.modules import WeightSpec
from smallify.quant.primitives import FP8_FORMATS, INT8_ACT, INT8_WEIGHT, SUPPORTED_BITS, UINT8_ACT, FloatFormat, IntFormat

CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
ACT_DTYPES = ("uint8", "int8")
FLOAT_DTYPES = ("fp16", "bf16")
AUTO_GROUPS = (128, 64, 32)


def check_bits(name: str, bits) -> None:
    """ConfigError naming ``name`` unless ``bits`` is a supported integer width (2..8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(f"{name}={bits!r} is not supported; accepted: integers 2..8")


def _check_group(group_size, allow_auto: bool = False) -> None:
    if group_size is None or (allow_auto and group_size == "auto"):
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(f"group_size={group_size!r} is not supported; accepted: an integer >= 2 that divides "
                          f"each layer's input channels, None (one scale per output channel)"
                          + (" or 'auto'" if allow_auto else ""))


def _check_layer_bits(layer_bits: dict) -> dict:
    if not isinstance(layer_bits, dict):
        raise ConfigError(f"layer_bits must map layer-name patterns to bits, got {type(layer_bits).__name__}")
    for pattern, bits in layer_bits.items():
        if bits != "float":
            check_bits(f"layer_bits[{pattern!r}]", bits)
    return dict(layer_bits)


def check_group_fits(group_size: int | None, in_channels: int, layer: str, auto: bool = False) -> None:
    """A group size that does not divide a layer's input channels is an error naming the layer."""
    if group_size is None or in_channels % group_size == 0:
        return
    fits = [g for g in range(2, in_channels + 1) if in_channels % g == 0]
    accepted = f"{', '.join(map(str, fits))}" if 0 < len(fits) <= 6 else f"a divisor of {in_channels}" if fits \
        else "no group size fits"
    auto_text = "'auto', " if auto else ""
    raise ConfigError(f"group_size={group_size} does not divide the {in_channels} input channels of layer "
                      f"{layer!r}; accepted: {accepted}, {auto_text}None (one scale per output channel), or leave the layer "
                      f"out of the grouping (skip=({layer!r},) or layer_bits={{{layer!r}: 'float'}})")


def saturating_cpu(cpuinfo: str | None = None) -> bool:
    """True on an x86 CPU without AVX-512 VNNI, AVX-VNNI or AMX (e.g. an AVX2-only EPYC): there ONNX Runtime's
    uint8 x int8 kernels add pairs of products in saturating 16-bit lanes (vpmaddubsw), so full-range int8
    weights overflow: on such a machine the ONNX corpus's int8 output SQNR read 11.9 dB at worst with 8-bit
    weights and 31.0 dB with 7-bit ones (``benchmarks/onnx_corpus.py --reduce-range off|auto``; ONNX Runtime's
    quantizer calls the remedy ``reduce_range``)."""
    import platform

    from smallify.measure.machine import cpu_flags

    if cpuinfo is None and platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = cpu_flags(cpuinfo)
    return bool(flags) and not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags


def resolve_reduce_range(value) -> bool:
    """``reduce_range``: True (7-bit weights, safe on every x86 CPU), False (8-bit) or 'auto' (7-bit only where
    this machine's integer kernels saturate: see ``saturating_cpu``). Resolved once, so a saved config says
    what was done."""
    if value == "auto":
        return saturating_cpu()
    if not isinstance(value, bool):
        raise ConfigError(f"reduce_range={value!r} is not supported; accepted: True (7-bit weights), False, 'auto'")
    return value


def patterns(name: str, value) -> tuple[str, ...]:
    """A ``skip``/``layers`` value as a tuple of fnmatch patterns (one string or an iterable of strings)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{name}={value!r} is not supported; accepted: a layer-name pattern (fnmatch) or a list of them")


def first_match(patterns, names) -> str | None:
    """The first of ``patterns`` (fnmatch, case-sensitive) that matches any of ``names``; None if none does."""
    return next((p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)), None)


@dataclasses.dataclass
class Int8Static(Config):
    """INT8 weights and activations, activations calibrated on data (static post-training quantization).

    Weights: symmetric INT8 (narrow range, zero point 0), per output channel unless ``per_channel=False``.
    Activations: asymmetric per-tensor, ranges by ``calibration``: 'minmax', 'percentile' (two-sided,
    ``percentile`` % kept), 'entropy' (KL divergence, as TensorRT's calibrator) or 'mse' (least squared error); ``activation_dtype`` 'uint8' (the default: x86 VNNI kernels take
    unsigned activations with signed weights, several times faster in ONNX Runtime than int8 activations).
    ``scheme``: where activations are quantized: 'cnn' (integer chains through Conv/Add/pool), 'transformer'
    (inputs of MatMul/Gemm only), or 'auto' (transformer when the graph holds LayerNorm/Softmax).
    ``smooth_quant``: alpha of SmoothQuant (ONNX models): per input channel, move activation range into the
    MatMul weights, s = max|x|^alpha / max|W|^(1-alpha), so that outlier channels stop dominating the
    per-tensor activation scale. 'auto' (default): 0.8 with the transformer scheme (MiniLM-L6 in
    ``benchmarks/ptq_minilm.py``: mean cosine 0.9927 without, 0.9982 with), off for CNNs; None turns it off.
    ``skip``: fnmatch patterns of layer names left in float (e.g. ``("stem.*", "fc")``).
    ``weight_bits`` (2..8, default 8) and ``group_size`` (None: per channel) set the weights' grid; below 8
    bits the weights are stored packed (ONNX int4) and the layer runs in float on dequantized weights.
    ``layer_bits``: per-layer overrides, pattern -> bits or 'float' (mixed precision; first match wins).
    ``reduce_range``: 8-bit weights on a 7-bit grid ([-63, 63]); 'auto' (default) does so where this CPU has no
    VNNI/AMX and ONNX Runtime's integer kernels would saturate (``saturating_cpu``); the report says so.
    """

    kind = "int8_static"
    verbs = ("quantize",)
    calibration: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    activation_dtype: str = "uint8"
    skip: tuple[str, ...] = ()
    max_calibration_samples: int | None = None
    scheme: str = "auto"
    smooth_quant: float | str | None = "auto"
    weight_bits: int = 8
    group_size: int | None = None
    layer_bits: dict = dataclasses.field(default_factory=dict)
    reduce_range: bool | str = "auto"

    @property
    def activation_format(self) -> IntFormat | FloatFormat:
        return UINT8_ACT if self.activation_dtype == "uint8" else INT8_ACT

    def skip_pattern(self, *names: str) -> str | None:
        """The first ``skip`` pattern that matches any of a layer's ``names``, or None."""
        return first_match(self.skip, names)

    def weight_spec(self, *names: str, in_channels: int | None = None) -> WeightSpec:
        """The weight grid of the layer called ``names`` (``layer_bits`` first, then ``weight_bits``); with
        ``in_channels``, a ``group_size`` that does not divide them is an error naming the layer."""
        pattern = first_match(self.layer_bits, names)
        bits = self.layer_bits[pattern] if pattern is not None else self.weight_bits
        if bits == "float":
            return WeightSpec(None)
        if in_channels is not None:
            check_group_fits(self.group_size, in_channels, names[0])
        if bits == 8 and self.reduce_range is True:
            bits = 7
        fmt = INT8_WEIGHT if bits == 8 else IntFormat(bits, signed=True, symmetric=True)
        return WeightSpec(fmt, self.per_channel, self.group_size)

    def __post_init__(self):
        self.reduce_range = resolve_reduce_range(self.reduce_range)
        check_bits("weight_bits", self.weight_bits)
        _check_group(self.group_size)
        self.layer_bits = _check_layer_bits(self.layer_bits)
        if self.smooth_quant == "auto":
            pass
        elif self.smooth_quant is not None and (isinstance(self.smooth_quant, str)
                                                 or not 0.0 <= float(self.smooth_quant) <= 1.0):
            raise ConfigError(f"smooth_quant={self.smooth_quant!r} is the migration strength alpha; accepted: "
                              "a number in [0, 1], 'auto' (0.8 for the transformer scheme, off for CNNs) "
                              "or None to turn it off")
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("calibration", self.calibration, CALIBRATIONS)
        check_choice("activation_dtype", self.activation_dtype, ACT_DTYPES)
        if not isinstance(self.percentile, numbers.Real) or isinstance(self.percentile, bool) \
                or not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile={self.percentile!r} must lie in (50, 100]")
        self.skip = patterns("skip", self.skip)
        if self.max_calibration_samples is not None and (not isinstance(self.max_calibration_samples, numbers.Integral)
                                                          or self.max_calibration_samples < 1):
            raise ConfigError(f"max_calibration_samples={self.max_calibration_samples!r} must be >= 1 or None")


@dataclasses.dataclass
class FP8Static(Int8Static):
    """FP8 weights and activations (OCP ``format`` 'e4m3' or 'e5m2'), static scales: activations per tensor
    from calibration (``calibration`` as for INT8), weights per output channel. Simulated exactly in PyTorch
    (torch's float8 dtypes); ONNX output stores weights as FP8 tensors and quantizes activations with
    FP8 QuantizeLinear/DequantizeLinear. Meant for runtimes with FP8 kernels (Hopper/Ada GPUs, Gaudi); on
    x86 CPUs the INT8 formats are the fast ones. ONNX Runtime (1.31) runs FP8 activations only with graph
    optimization level 'basic' (its MatMulIntegerToFloat fusion rejects FP8); ``smallify bench`` does that."""

    kind = "fp8_static"
    format: str = "e4m3"
    smooth_quant: float | str | None = None

    @property
    def activation_format(self) -> FloatFormat:
        return FloatFormat(self.format)

    def weight_spec(self, *names: str, in_channels: int | None = None) -> WeightSpec:
        pattern = first_match(self.layer_bits, names)
        if pattern is not None and self.layer_bits[pattern] == "float":
            return WeightSpec(None)
        return WeightSpec(FloatFormat(self.format), self.per_channel)

    def __post_init__(self):
        check_choice("format", self.format, tuple(FP8_FORMATS))
        if self.calibration not in ("minmax", "percentile"):
            raise ConfigError(f"calibration={self.calibration!r} is not supported with FP8 (its histogram search "
                              "targets integer grids); accepted: 'minmax', 'percentile'")
        if self.weight_bits != 8 or self.group_size is not None:
            raise ConfigError("FP8Static takes no weight_bits or group_size; FP8 is 8 bits with one scale per "
                              "output channel (per_channel=True) or per tensor")
        super().__post_init__()
        self.reduce_range = False      # an integer-kernel matter: FP8 weights keep their grid


@dataclasses.dataclass
class WeightOnly(Config):
    """Weight-only integer quantization (round to nearest): weights on a ``bits``-bit grid (2..8), activations
    stay float. ``group_size``: one scale per group of that many consecutive input channels; 'auto' (default)
    takes the largest of 128, 64, 32 that divides each layer's input channels, else one scale per output
    channel; None: per output channel. ``symmetric=False`` adds a zero point per group (unsigned grid).
    Weights below 8 bits are stored packed (``smallify.save``: bits/8 bytes per weight; ONNX: int4/uint4
    tensors that ONNX Runtime runs as MatMulNBits). ``layer_bits``: per-layer overrides (pattern -> bits or
    'float'); ``skip``: patterns left in float."""

    kind = "weight_only"
    verbs = ("quantize",)
    bits: int = 4
    group_size: int | str | None = "auto"
    symmetric: bool = True
    skip: tuple[str, ...] = ()
    layer_bits: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_bits("bits", self.bits)
        _check_group(self.group_size, allow_auto=True)
        self.layer_bits = _check_layer_bits(self.layer_bits)
        self.skip = patterns("skip", self.skip)

    def skip_pattern(self, *names: str) -> str | None:
        return first_match(self.skip, names)

    def weight_spec(self, in_channels: int, *names: str) -> WeightSpec:
        """The grid of a layer with ``in_channels`` inputs per output (raises when ``group_size`` does not divide)."""
        pattern = first_match(self.layer_bits, names)
        bits = self.layer_bits[pattern] if pattern is not None else self.bits
        if bits == "float" or self.skip_pattern(*names):
            return WeightSpec(None)
        fmt = IntFormat(bits, signed=self.symmetric, symmetric=self.symmetric)
        group = self.group_size
        if group == "auto":
            group = next((g for g in AUTO_GROUPS if in_channels % g == 0 and in_channels > g), None)
        else:
            check_group_fits(group, in_channels, names[0], auto=True)
        return WeightSpec(fmt, True, group)


@dataclasses.dataclass
class Float16(Config):
    """Half-precision conversion: ``dtype`` 'fp16' or 'bf16' for the layers matching ``layers`` (fnmatch
    patterns; default every Conv/Linear layer) minus ``skip``. PyTorch: those layers compute in half precision
    (inputs cast in, outputs cast back to float32). ONNX: their weights are stored in half precision (half the
    bytes) with a Cast to float32 in front of the layer, as OpenVINO's compressed-FP16 models do."""

    kind = "float16"
    verbs = ("quantize",)
    dtype: str = "fp16"
    layers: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        check_choice("dtype", self.dtype, FLOAT_DTYPES)
        self.layers = patterns("layers", self.layers)
        self.skip = patterns("skip", self.skip)

    def selects(self, *names: str) -> bool:
        return first_match(self.layers, names) is not None and first_match(self.skip, names) is None
