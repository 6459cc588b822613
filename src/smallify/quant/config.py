"""Quantization method configs."""
from __future__ import annotations

import dataclasses
import fnmatch

from smallify.config import Config, check_choice
from smallify.errors import ConfigError
from smallify.quant.placement import SCHEMES
from smallify.quant.primitives import INT8_ACT, UINT8_ACT, IntFormat

CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
ACT_DTYPES = ("uint8", "int8")


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
    """

    kind = "int8_static"
    calibration: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    activation_dtype: str = "uint8"
    skip: tuple[str, ...] = ()
    max_calibration_samples: int | None = None
    scheme: str = "auto"
    smooth_quant: float | str | None = "auto"

    @property
    def activation_format(self) -> IntFormat:
        return UINT8_ACT if self.activation_dtype == "uint8" else INT8_ACT

    def skip_pattern(self, *names: str) -> str | None:
        """The first ``skip`` pattern that matches any of a layer's ``names``, or None."""
        return next((p for p in self.skip if any(fnmatch.fnmatchcase(n, p) for n in names)), None)

    def __post_init__(self):
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
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile={self.percentile!r} must lie in (50, 100]")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(self.skip)
        if self.max_calibration_samples is not None and self.max_calibration_samples < 1:
            raise ConfigError(f"max_calibration_samples={self.max_calibration_samples!r} must be >= 1 or None")
