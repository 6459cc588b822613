"""Affine quantization numerics: pure functions, tensors in, tensors out.

Conventions (those of ONNX QuantizeLinear/DequantizeLinear):
    q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)
    x' = (q - zero_point) * scale
Symmetric signed ranges are narrow ([-127, 127] at 8 bits) so that +max and -max both round-trip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smallify.errors import ConfigError

SUPPORTED_BITS = range(2, 9)


@dataclass(frozen=True)
class IntFormat:
    """An integer grid: ``bits`` wide, ``signed`` or not, ``symmetric`` (zero point fixed) or affine."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits!r} is not supported; accepted: integers 2..8")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8


INT8_WEIGHT = IntFormat(8, signed=True, symmetric=True)
UINT8_ACT = IntFormat(8, signed=False, symmetric=False)
INT8_ACT = IntFormat(8, signed=True, symmetric=False)


def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that map [min_val, max_val] onto ``fmt``'s grid.

    Works element-wise: scalars give per-tensor parameters, vectors per-channel ones. The range is widened
    to include 0 so that 0 is exactly representable (zero padding, ReLU outputs).
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ConfigError("cannot compute quantization parameters of a range holding NaN or Inf")
    if (min_val > max_val).any():
        raise ConfigError("min_val must not exceed max_val")
    min_val, max_val = torch.clamp(min_val, max=0.0), torch.clamp(max_val, min=0.0)
    if fmt.symmetric:
        amax = torch.maximum(-min_val, max_val)
        half = 2 ** (fmt.bits - 1) - 1
        scale = amax / half
        zero = torch.full_like(scale, 0 if fmt.signed else 2 ** (fmt.bits - 1), dtype=torch.int32)
    else:
        scale = (max_val - min_val) / (fmt.qmax - fmt.qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(fmt.qmin - torch.round(min_val / safe), fmt.qmin, fmt.qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)
    return scale, zero


def _shape_for(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * x.ndim
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat,
             axis: int | None = None) -> torch.Tensor:
    """Float -> integers on ``fmt``'s grid (returned as int32 so every bit width fits)."""
    s, z = _shape_for(scale, x, axis), _shape_for(zero_point, x, axis)
    q = torch.round(x.float() / s) + z
    return torch.clamp(q, fmt.qmin, fmt.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    s, z = _shape_for(scale, q, axis), _shape_for(zero_point, q, axis)
    return (q.to(torch.int32) - z).to(torch.float32) * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat,
                  axis: int | None = None) -> torch.Tensor:
    """quantize then dequantize, in float; the straight-through estimator passes gradients inside the range."""
    s, z = _shape_for(scale, x, axis), _shape_for(zero_point, x, axis)
    q = torch.clamp(torch.round(x / s) + z, fmt.qmin, fmt.qmax)
    y = (q - z) * s
    if x.requires_grad:
        y = x + (y - x).detach()
    return y


def weight_qparams(w: torch.Tensor, fmt: IntFormat = INT8_WEIGHT, per_channel: bool = True,
                   axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max parameters of a weight tensor, per output channel (``axis``) or per tensor."""
    if not torch.isfinite(w).all():
        raise ConfigError("weight holds NaN or Inf; cannot quantize it")
    if per_channel:
        flat = w.detach().transpose(0, axis).reshape(w.shape[axis], -1)
        return compute_qparams(flat.min(1).values, flat.max(1).values, fmt)
    return compute_qparams(w.detach().min(), w.detach().max(), fmt)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise.clamp_min(1e-30)))
