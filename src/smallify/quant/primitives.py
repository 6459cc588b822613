"""Affine quantization numerics: pure functions, tensors in, tensors out.

Conventions (those of ONNX QuantizeLinear/DequantizeLinear):
    q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)
    x' = (q - zero_point) * scale
Symmetric signed ranges are narrow ([-127, 127] at 8 bits) so that +max and -max both round-trip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smallify.errors import ConfigError, ModelError

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


@dataclass(frozen=True)
class FloatFormat:
    """An 8-bit float grid (OCP FP8): 'e4m3' (max 448, finer steps: weights and activations) or 'e5m2'
    (max 57344, wider range: gradients, outliers). Values are scaled into the grid: x' = fp8(x / scale) * scale."""

    name: str = "e4m3"

    def __post_init__(self):
        if self.name not in FP8_FORMATS:
            raise ConfigError(f"fp8 format {self.name!r} is not supported; accepted: {', '.join(FP8_FORMATS)}")

    @property
    def bits(self) -> int:
        return 8

    @property
    def max(self) -> float:
        return FP8_FORMATS[self.name][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return FP8_FORMATS[self.name][0]


FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}

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


def fp8_scale(amax: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The scale that maps |x| <= amax onto the format's largest finite value."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Float -> FP8 values (a torch float8 tensor), saturating at the format's maximum (ONNX saturate=1)."""
    return torch.clamp(x.float() / scale, -fmt.max, fmt.max).to(fmt.torch_dtype)


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round to the FP8 grid and back (``scale`` broadcasts against ``x``); straight-through gradient."""
    y = fp8_quantize(x, scale, fmt).to(torch.float32) * scale
    if x.requires_grad:
        y = x + (y - x).detach()
    return y


def group_shape(shape: tuple[int, ...], group_size: int, axis: int) -> tuple[int, ...]:
    """Shape of per-group parameters: ``shape`` with ``axis`` divided by ``group_size`` (ONNX block layout)."""
    if shape[axis] % group_size:
        raise ConfigError(f"group_size={group_size} does not divide the {shape[axis]} channels of a weight of "
                          f"shape {tuple(shape)}; accepted: a divisor of {shape[axis]} (or None for per-channel)")
    out = list(shape)
    out[axis] //= group_size
    return tuple(out)


def expand_groups(param: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """Per-group parameters repeated to the weight's shape (each value covers ``group_size`` elements)."""
    return param.repeat_interleave(group_size, dim=axis)


def weight_qparams(w: torch.Tensor, fmt: IntFormat = INT8_WEIGHT, per_channel: bool = True,
                   axis: int = 0, group_size: int | None = None,
                   group_axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max parameters of a weight tensor: per output channel (``axis``), per tensor, or per group of
    ``group_size`` consecutive elements along ``group_axis`` (shape from ``group_shape``)."""
    if not torch.isfinite(w).all():
        raise ModelError("weight holds NaN or Inf; cannot quantize it (fix the model, or keep the layer in float)")
    w = w.detach()
    if group_size is not None:
        shape = group_shape(tuple(w.shape), group_size, group_axis)
        blocks = w.movedim(group_axis, -1).reshape(*[s for i, s in enumerate(w.shape) if i != group_axis], -1, group_size)
        lo, hi = blocks.min(-1).values.movedim(-1, group_axis), blocks.max(-1).values.movedim(-1, group_axis)
        scale, zero = compute_qparams(lo.reshape(shape), hi.reshape(shape), fmt)
        return scale, zero
    if per_channel:
        flat = w.transpose(0, axis).reshape(w.shape[axis], -1)
        return compute_qparams(flat.min(1).values, flat.max(1).values, fmt)
    return compute_qparams(w.min(), w.max(), fmt)


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: IntFormat,
                      grad_scale: float) -> torch.Tensor:
    """Fake quantization with a learnable step size (LSQ, Esser et al. 2020). ``scale`` and ``zero_point``
    broadcast against ``x``. Gradients: straight through the rounding for ``x`` inside the range; for
    ``scale`` the LSQ estimate, multiplied by ``grad_scale`` (1 / sqrt(elements * qmax) in the paper)."""
    s = scale * grad_scale + (scale - scale * grad_scale).detach()   # value: scale; gradient: scaled
    v = torch.clamp(x / s + zero_point, fmt.qmin, fmt.qmax)
    q = v + (torch.round(v) - v).detach()                            # round with a straight-through gradient
    return (q - zero_point) * s


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    reference, approx = reference.detach(), approx.detach()
    noise = (reference.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise.clamp_min(1e-30)))
