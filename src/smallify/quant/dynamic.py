"""Dynamic INT8 quantization of Linear/MatMul layers: int8 weights (per output channel) fixed ahead of time,
activations quantized on the fly per tensor (uint8, asymmetric) from each input's own range, so no
calibration data is needed. The ONNX form is the one ONNX Runtime fuses into DynamicQuantizeMatMul:

    x -> DynamicQuantizeLinear -> MatMulInteger(x_q, W_q int8, x_zp, 0) -> Cast -> Mul(x_scale * w_scale) [-> Add(bias)]
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from smallify.config import Config
from smallify.quant import modules as qmod
from smallify.quant.primitives import INT8_WEIGHT, UINT8_ACT, compute_qparams, fake_quantize
from smallify.quant.report import LayerReport, QuantReport


@dataclasses.dataclass
class Int8Dynamic(Config):
    """INT8 weights (symmetric, per output channel unless ``per_channel=False``) and activations quantized at
    run time from their own range: no calibration. For Linear-heavy models (transformers, RNN heads); ``skip``:
    fnmatch patterns of layers kept in float."""

    kind = "int8_dynamic"
    verbs = ("quantize",)
    per_channel: bool = True
    skip: tuple[str, ...] = ()
    reduce_range: bool | str = "auto"     # 7-bit weights where the CPU's integer kernels saturate (Int8Static)

    def __post_init__(self):
        from smallify.quant.config import patterns, resolve_reduce_range

        self.skip = patterns("skip", self.skip)
        self.reduce_range = resolve_reduce_range(self.reduce_range)

    @property
    def weight_format(self):
        from smallify.quant.primitives import IntFormat

        return IntFormat(7) if self.reduce_range else INT8_WEIGHT

    def skip_pattern(self, *names: str) -> str | None:
        from smallify.quant.config import first_match

        return first_match(self.skip, names)


def dynamic_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """What DynamicQuantizeLinear + DequantizeLinear compute: uint8 over the whole tensor's range (with 0)."""
    scale, zero = compute_qparams(x.detach().min(), x.detach().max(), UINT8_ACT)
    return fake_quantize(x, scale, zero, UINT8_ACT)


class DynamicQuantLinear(qmod.QuantLinear):
    """A Linear with int8 weights whose input is quantized per call from its own range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(dynamic_fake_quantize(x), self.qweight(), self.bias)


def dynamic_module(model: nn.Module, config: Int8Dynamic) -> nn.Module:
    """A copy of ``model`` whose nn.Linear layers (not skipped) are dynamic INT8 twins."""
    model = copy.deepcopy(model).eval()
    reports = []
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        pattern = config.skip_pattern(name)
        if pattern:
            reports.append(LayerReport(name, "Linear", "float", f"skipped by pattern {pattern!r}"))
            continue
        qmod.replace_module(model, name, DynamicQuantLinear.from_float(m, qmod.WeightSpec(config.weight_format, config.per_channel)))
        reports.append(LayerReport(name, "Linear", "quantized", "int8 weights, dynamic uint8 activations"))
    model.quant_config = config
    model.quant_report = model.report = QuantReport(config.to_dict(), reports, 0, 0, 0.0, "dynamic")
    return model


