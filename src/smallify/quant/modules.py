"""Quantized twins of float modules (``QuantTwin``), and the open registry that maps a float type to its
twin (``register_twin``).

A twin keeps float weights and fake-quantizes them in ``forward`` (per output channel, symmetric INT8), so
the module computes exactly what the integer kernel computes after export. Activations are quantized by
``ActQuant`` modules placed between layers (see ``placement.py``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smallify.errors import ConfigError
from smallify.quant import observers
from smallify.quant.primitives import (INT8_WEIGHT, FloatFormat, IntFormat, compute_qparams, expand_groups,
                                       fake_quantize, fp8_fake_quantize, fp8_quantize, fp8_scale, lsq_fake_quantize, quantize,
                                       weight_qparams)


def act_qparams(lo, hi, fmt: IntFormat | FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scale and zero point of an activation range: affine on integer grids, symmetric for FP8."""
    if isinstance(fmt, FloatFormat):
        return fp8_scale(max(abs(float(lo)), abs(float(hi))), fmt), torch.tensor(0, dtype=torch.int32)
    return compute_qparams(lo, hi, fmt)


class ActQuant(nn.Module):
    """Per-tensor activation quantizer: observes while calibrating, then fake-quantizes (integer or FP8 grid).
    After ``make_scale_learnable`` (QAT) its scale is a parameter trained with the LSQ gradient."""

    def __init__(self, fmt: IntFormat | FloatFormat, observer=None, name: str = ""):
        super().__init__()
        self.fmt, self.observer, self.tensor_name = fmt, observer, name
        self.calibrating = observer is not None
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def freeze(self) -> None:
        """Turn the observed range into a scale and zero point, and start quantizing."""
        self.set_qparams(*act_qparams(*observers.range_of(self.observer), self.fmt))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(scale).reshape(()))
            self.zero_point.copy_(torch.as_tensor(zero_point).reshape(()))
        self.calibrating, self.observer = False, None

    def make_scale_learnable(self) -> None:
        if isinstance(self.fmt, IntFormat) and not isinstance(self.scale, nn.Parameter):
            scale = self.scale
            del self._buffers["scale"]
            self.scale = nn.Parameter(scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observer.observe(x)
            return x
        if isinstance(self.fmt, FloatFormat):
            return fp8_fake_quantize(x, self.scale, self.fmt)
        if isinstance(self.scale, nn.Parameter):
            grad_scale = 1.0 / math.sqrt(x[0].numel() * self.fmt.qmax)
            return lsq_fake_quantize(x, self.scale.clamp_min(1e-12), self.zero_point, self.fmt, grad_scale)
        # exported to ONNX as QuantizeLinear + DequantizeLinear
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.fmt.qmin, self.fmt.qmax)

    def extra_repr(self) -> str:
        if isinstance(self.fmt, FloatFormat):
            return f"{self.tensor_name}, fp8-{self.fmt.name}"
        return f"{self.tensor_name}, {'int' if self.fmt.signed else 'uint'}{self.fmt.bits}"


@dataclass(frozen=True)
class WeightSpec:
    """How a layer's weight is quantized: ``fmt`` an integer or FP8 grid (None: left in float); one scale
    per output channel, per tensor (``per_channel=False``), or per group of ``group_size`` consecutive input
    channels (integer formats; the ONNX DequantizeLinear block layout)."""

    fmt: IntFormat | FloatFormat | None = INT8_WEIGHT
    per_channel: bool = True
    group_size: int | None = None

    def __post_init__(self):
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or self.group_size < 2:
                raise ConfigError(f"group_size={self.group_size!r} is not supported; accepted: an integer >= 2 "
                                  "that divides the layer's input channels, or None (per output channel)")
            if isinstance(self.fmt, FloatFormat):
                raise ConfigError("group_size applies to integer formats; FP8 weights take one scale per "
                                  "output channel or per tensor (group_size=None)")

    def describe(self) -> str:
        if self.fmt is None:
            return "float"
        name = f"fp8-{self.fmt.name}" if isinstance(self.fmt, FloatFormat) else \
            f"{'int' if self.fmt.signed else 'uint'}{self.fmt.bits}"
        gran = f"group {self.group_size}" if self.group_size else ("per-channel" if self.per_channel else "per-tensor")
        return f"{name} {gran}"


def weight_params(w: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of weight ``w`` (PyTorch layout: output channels on axis 0) for ``spec``:
    shape [O] per channel, [] per tensor, ``group_shape`` per group."""
    fmt = spec.fmt
    if fmt is None:
        return torch.ones(()), torch.zeros((), dtype=torch.int32)
    if isinstance(fmt, FloatFormat):
        a = w.detach().abs()
        amax = a.flatten(1).max(1).values if spec.per_channel else a.max()
        return fp8_scale(amax, fmt), torch.zeros((), dtype=torch.int32)
    return weight_qparams(w, fmt, spec.per_channel, 0, spec.group_size, 1)


def broadcast_param(param: torch.Tensor, spec: WeightSpec, ndim: int) -> torch.Tensor:
    """A weight's scale or zero point shaped to broadcast against the weight."""
    if spec.group_size:
        return expand_groups(param, spec.group_size, 1)
    if param.ndim == 1:
        return param.reshape(-1, *[1] * (ndim - 1))
    return param


def weight_values(w: torch.Tensor, spec: WeightSpec, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The stored values of ``w``: int32 integers on an integer grid, or a torch float8 tensor."""
    s = broadcast_param(scale.detach(), spec, w.ndim)
    if isinstance(spec.fmt, FloatFormat):
        return fp8_quantize(w.detach(), s, spec.fmt)
    return quantize(w.detach(), s, broadcast_param(zero, spec, w.ndim), spec.fmt)


class QuantTwin:
    """Base of every quantized twin: a float layer's subclass (or stand-in) whose weight is fake-quantized in
    ``forward``. Scales and zero points are buffers (``weight_scale``, ``weight_zero_point``), or a learnable
    parameter after ``make_scale_learnable`` (QAT with LSQ). A twin made by the untraced (eager) path also
    holds ``input_quant``, the ``ActQuant`` of its input.

    A new twin is one class in this file: subclass ``QuantTwin`` and the float layer it computes like, write
    ``from_float``, and decorate it with ``register_twin(float type)``. ``float_base`` is the plain layer the
    twin exports as (``to_float``)."""

    spec: WeightSpec = WeightSpec()
    kind: str = "linear"                 # the op kind in the placement rule ('conv', 'linear')
    float_base: type = nn.Module         # the plain torch layer ``to_float`` returns

    @classmethod
    def from_float(cls, m: nn.Module, spec: WeightSpec = WeightSpec()) -> "QuantTwin":
        raise NotImplementedError

    @staticmethod
    def float_weight(m: nn.Module) -> torch.Tensor:
        """The float layer's weight in PyTorch layout (output channels on axis 0)."""
        return m.weight

    def _init_weight_quant(self, spec: WeightSpec) -> None:
        self.spec = spec
        scale, zero = weight_params(self.weight, spec)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        q = self._modules.get("input_quant")
        return x if q is None else q(x)

    def make_scale_learnable(self) -> None:
        """Turn ``weight_scale`` into a parameter trained with the LSQ gradient (integer formats)."""
        if isinstance(self.spec.fmt, IntFormat) and not isinstance(self.weight_scale, nn.Parameter):
            scale = self.weight_scale
            del self._buffers["weight_scale"]
            self.weight_scale = nn.Parameter(scale.clone())

    def _broadcast(self, param: torch.Tensor) -> torch.Tensor:
        return broadcast_param(param, self.spec, self.weight.ndim)

    def qweight(self) -> torch.Tensor:
        fmt = self.spec.fmt
        if fmt is None:
            return self.weight
        scale = self._broadcast(self.weight_scale)
        if isinstance(fmt, FloatFormat):
            return fp8_fake_quantize(self.weight, scale, fmt)
        zero = self._broadcast(self.weight_zero_point)
        if isinstance(self.weight_scale, nn.Parameter):
            grad_scale = 1.0 / math.sqrt(self.weight[0].numel() * fmt.qmax)
            return lsq_fake_quantize(self.weight, scale.clamp_min(1e-12), zero, fmt, grad_scale)
        return fake_quantize(self.weight, scale, zero, fmt)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, scale, zero point) as they are saved: int32 integers or float8 values, PyTorch layout."""
        scale = self.weight_scale.detach().clamp_min(1e-12) if isinstance(self.weight_scale, nn.Parameter) \
            else self.weight_scale
        return weight_values(self.weight, self.spec, scale, self.weight_zero_point), scale, self.weight_zero_point

    def to_float(self) -> nn.Module:
        """A plain ``float_base`` layer holding the dequantized weight (exact grid values), for export."""
        plain = copy.deepcopy(self)
        plain._modules.pop("input_quant", None)
        plain.__class__ = self.float_base
        with torch.no_grad():
            plain.weight.copy_(self.qweight())
        for buf in ("weight_scale", "weight_zero_point"):
            delattr(plain, buf)
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.spec.describe()}"


# float type (or 'module.QualName' of an optional dependency's class) -> twin. Looked up along the MRO.
REGISTRY: dict[type | str, type[QuantTwin]] = {}


def register_twin(float_type: type | str, kind: str | None = None):
    """Class decorator: make the decorated ``QuantTwin`` the twin of ``float_type`` (a class, or the dotted
    'module.QualName' of a class from an optional dependency, matched without importing it)."""
    def deco(twin: type[QuantTwin]) -> type[QuantTwin]:
        if not issubclass(twin, QuantTwin):
            raise TypeError(f"{twin.__name__} must subclass QuantTwin")
        if kind is not None:
            twin.kind = kind
        REGISTRY[float_type] = twin
        return twin
    return deco


def _type_key(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def handled_names() -> list[str]:
    """The float layer types that have a twin, for messages."""
    return [k.__name__ if isinstance(k, type) else k.rpartition(".")[2] for k in REGISTRY]


@register_twin(nn.Conv2d, kind="conv")
class QuantConv2d(QuantTwin, nn.Conv2d):
    float_base = nn.Conv2d

    @classmethod
    def from_float(cls, m: nn.Conv2d, spec: WeightSpec = WeightSpec()) -> "QuantConv2d":
        q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None, m.padding_mode)
        q.load_state_dict(m.state_dict())
        q._init_weight_quant(spec)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quant_input(x), self.qweight(), self.bias)


@register_twin(nn.Linear, kind="linear")
class QuantLinear(QuantTwin, nn.Linear):
    float_base = nn.Linear

    @classmethod
    def from_float(cls, m: nn.Linear, spec: WeightSpec = WeightSpec()) -> "QuantLinear":
        q = cls(m.in_features, m.out_features, m.bias is not None)
        q.load_state_dict(m.state_dict())
        q._init_weight_quant(spec)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.qweight(), self.bias)


@register_twin("transformers.pytorch_utils.Conv1D", kind="linear")
class QuantGPT2Conv1D(QuantLinear):
    """Twin of transformers' ``Conv1D`` (GPT-2, GPT): a Linear whose weight is stored transposed, [in, out].
    The twin holds it as a Linear does ([out, in]) and exports as ``nn.Linear``."""

    @staticmethod
    def float_weight(m: nn.Module) -> torch.Tensor:
        return m.weight.t()

    @classmethod
    def from_float(cls, m: nn.Module, spec: WeightSpec = WeightSpec()) -> "QuantGPT2Conv1D":
        q = cls(m.nx, m.nf, True)
        with torch.no_grad():
            q.weight.copy_(m.weight.t())
            q.bias.copy_(m.bias)
        q._init_weight_quant(spec)
        return q


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) is."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def lookup(module: nn.Module) -> type[QuantTwin] | None:
    """The twin class of ``module``'s type (along its MRO), or None (no twin, or already a twin)."""
    if isinstance(module, QuantTwin):
        return None
    for klass in type(module).__mro__:
        twin = REGISTRY.get(klass) or REGISTRY.get(_type_key(klass))
        if twin is not None:
            return twin
    return None
