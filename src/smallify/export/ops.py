"""A custom op that the ONNX exporter writes as QuantizeLinear -> DequantizeLinear with constant parameters.

torch's own fake_quantize ops have no symbolic-shape support in torch.export, so the exported copy of a
quantized model calls this op instead; eagerly it computes the same thing.
"""
from __future__ import annotations

import onnx
import torch


@torch.library.custom_op("smallify::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


def _to_onnx(x, scale: float, zero_point: int, qmin: int, qmax: int):
    from onnxscript import opset20 as op

    dtype = onnx.TensorProto.UINT8 if qmin == 0 else onnx.TensorProto.INT8
    s = op.Constant(value=onnx.helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [scale]))
    z = op.Constant(value=onnx.helper.make_tensor("zero_point", dtype, [], [zero_point]))
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)


FP8_CODES = {"e4m3": (torch.float8_e4m3fn, onnx.TensorProto.FLOAT8E4M3FN), "e5m2": (torch.float8_e5m2, onnx.TensorProto.FLOAT8E5M2)}


@torch.library.custom_op("smallify::fp8_quantize_dequantize", mutates_args=())
def fp8_quantize_dequantize(x: torch.Tensor, scale: float, fmt: str) -> torch.Tensor:
    from smallify.quant.primitives import FloatFormat, fp8_fake_quantize

    return fp8_fake_quantize(x, torch.tensor(scale), FloatFormat(fmt))


@fp8_quantize_dequantize.register_fake
def _(x, scale, fmt):
    return torch.empty_like(x)


def _fp8_to_onnx(x, scale: float, fmt: str):
    from onnxscript import opset20 as op

    s = op.Constant(value=onnx.helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [scale]))
    z = op.Constant(value=onnx.helper.make_tensor("zero_point", FP8_CODES[fmt][1], [], [0.0]))
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)


TRANSLATIONS = {torch.ops.smallify.quantize_dequantize.default: _to_onnx,
                torch.ops.smallify.fp8_quantize_dequantize.default: _fp8_to_onnx}
