"""Quantized twins of float modules, and the registry that maps a float type to its twin.

A twin keeps float weights and fake-quantizes them in ``forward`` (per output channel, symmetric INT8), so
the module computes exactly what the integer kernel computes after export. Activations are quantized by
``ActQuant`` modules placed between layers (see ``placement.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smallify.quant import observers
from smallify.quant.primitives import INT8_WEIGHT, IntFormat, compute_qparams, fake_quantize, weight_qparams


class ActQuant(nn.Module):
    """Per-tensor activation quantizer: observes while calibrating, then fake-quantizes."""

    def __init__(self, fmt: IntFormat, observer=None, name: str = ""):
        super().__init__()
        self.fmt, self.observer, self.tensor_name = fmt, observer, name
        self.calibrating = observer is not None
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def freeze(self) -> None:
        """Turn the observed range into a scale and zero point, and start quantizing."""
        lo, hi = observers.range_of(self.observer)
        scale, zero = compute_qparams(lo, hi, self.fmt)
        self.set_qparams(scale, zero)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()))
        self.calibrating, self.observer = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observer.observe(x)
            return x
        # exported to ONNX as QuantizeLinear + DequantizeLinear
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.fmt.qmin, self.fmt.qmax)

    def extra_repr(self) -> str:
        return f"{self.tensor_name}, uint{self.fmt.bits}" if not self.fmt.signed else f"{self.tensor_name}, int{self.fmt.bits}"


class _WeightQuantMixin:
    fmt: IntFormat = INT8_WEIGHT

    def _init_weight_quant(self, per_channel: bool) -> None:
        self.per_channel = per_channel
        scale, zero = weight_qparams(self.weight, self.fmt, per_channel)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero)

    def qweight(self) -> torch.Tensor:
        axis = 0 if self.per_channel else None
        return fake_quantize(self.weight, self.weight_scale, self.weight_zero_point, self.fmt, axis)


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, m: nn.Conv2d, per_channel: bool = True) -> "QuantConv2d":
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None, m.padding_mode)
        q.load_state_dict(m.state_dict())
        q._init_weight_quant(per_channel)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.qweight(), self.bias)


class QuantLinear(_WeightQuantMixin, nn.Linear):
    @classmethod
    def from_float(cls, m: nn.Linear, per_channel: bool = True) -> "QuantLinear":
        q = cls(m.in_features, m.out_features, m.bias is not None)
        q.load_state_dict(m.state_dict())
        q._init_weight_quant(per_channel)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight(), self.bias)


# float type -> (kind in the placement rule, twin constructor). Looked up along the class's MRO.
REGISTRY: dict[type, tuple[str, type]] = {
    nn.Conv2d: ("conv", QuantConv2d),
    nn.Linear: ("linear", QuantLinear),
}


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) is."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def lookup(module: nn.Module) -> tuple[str, type] | None:
    if isinstance(module, (QuantConv2d, QuantLinear)):
        return None
    for klass in type(module).__mro__:
        if klass in REGISTRY:
            return REGISTRY[klass]
    return None
