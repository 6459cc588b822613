"""Weight-only quantization (round to nearest) and half-precision conversion, for PyTorch modules and ONNX.

PyTorch: Conv2d/Linear layers are swapped in a copy of the model for twins that hold the weight grid
(``modules.QuantConv2d``/``QuantLinear``) or compute in half precision (``HalfPrecision``); no tracing, so it
works on any module, Hugging Face models included. ONNX: the weights of Conv/Gemm/MatMul are stored
quantized (int4/int8/FP8) or in half precision and rebuilt in front of the layer.
"""
from __future__ import annotations

import copy
import time


import torch
from torch import nn

from smallify.quant import modules as qmod
from smallify.quant.config import Float16, WeightOnly
from smallify.quant.report import LayerReport, QuantReport

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class HalfPrecision(nn.Module):
    """A layer that computes in fp16/bf16: float32 in, cast to half, the layer, cast back to float32."""

    def __init__(self, layer: nn.Module, dtype: str):
        super().__init__()
        self.dtype = dtype
        self.layer = copy.deepcopy(layer).to(HALF[dtype])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(HALF[self.dtype])).to(x.dtype)

    def extra_repr(self) -> str:
        return self.dtype


def _weight_layers(model: nn.Module):
    for name, m in model.named_modules():
        twin = qmod.lookup(m)
        if twin is not None:
            yield name, m, twin


def unhandled_layers(model: nn.Module, what: str) -> list[LayerReport]:
    """Every module holding its own parameters that has no twin (LayerNorm, Embedding, custom layers), as a
    float layer with the reason: the report never says 'nothing left in float' while a weight stayed float."""
    reports = []
    for name, m in model.named_modules():
        if qmod.lookup(m) is None and not isinstance(m, (qmod.QuantTwin, HalfPrecision)) \
                and any(True for _ in m.parameters(recurse=False)):
            op = type(m).__name__ if name else "Parameter"
            reports.append(LayerReport(name or ", ".join(n for n, _ in m.named_parameters(recurse=False)), op, "float",
                                       f"{op} has no {what} implementation (handled: {', '.join(qmod.handled_names())})"))
    return reports


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each BatchNorm folded into the convolution before it (what every runtime and
    the ONNX exporter do), so that the weights quantized are the weights that run; models that torch.fx
    cannot trace (e.g. Hugging Face transformers, which have no BatchNorm) are copied as they are."""
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        return fuse(model)
    except Exception:
        return model


def weight_only_module(model: nn.Module, config: WeightOnly) -> nn.Module:
    """A copy of ``model`` with its Conv2d/Linear weights on ``config``'s grid; ``quant_report`` lists each."""
    model = fold_batchnorm(model)
    reports, start = [], time.perf_counter()
    for name, m, twin in list(_weight_layers(model)):
        spec = config.weight_spec(twin.float_weight(m).shape[1], name)
        if spec.fmt is None:
            pattern = config.skip_pattern(name)
            reports.append(LayerReport(name, type(m).__name__, "float",
                                       f"skipped by pattern {pattern!r}" if pattern else "layer_bits: float"))
            continue
        qmod.replace_module(model, name, twin.from_float(m, spec))
        reports.append(LayerReport(name, type(m).__name__, "quantized", spec.describe()))
    reports += unhandled_layers(model, "weight-only")
    model.quant_config = config
    model.quant_report = model.report = QuantReport(config.to_dict(), reports, 0, 0, time.perf_counter() - start,
                                                    "weight-only")
    return model


def half_module(model: nn.Module, config: Float16) -> nn.Module:
    """A copy of ``model`` whose selected Conv2d/Linear layers compute in ``config.dtype``."""
    model = fold_batchnorm(model)
    reports = []
    for name, m, _ in list(_weight_layers(model)):
        if config.selects(name):
            qmod.replace_module(model, name, HalfPrecision(m, config.dtype))
            reports.append(LayerReport(name, type(m).__name__, "quantized", config.dtype))
        else:
            reports.append(LayerReport(name, type(m).__name__, "float", "not selected by layers/skip"))
    reports += unhandled_layers(model, config.dtype)
    model.quant_config = config
    model.quant_report = model.report = QuantReport(config.to_dict(), reports, 0, 0, 0.0, config.dtype)
    return model


