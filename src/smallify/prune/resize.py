"""Per-layer-type resize handlers: how a layer keeps a subset of its channels along one dimension.

One table serves both channel pruning (``channel.apply`` keeps the chosen indices) and ``pack.fit_shapes``
(a factory-built model takes the shapes a pruned model was saved with). Dimensions: 'out' (output
channels), 'in' (input channels), 'dw' (a depthwise convolution's channels: in, out and groups together),
'bn' (a BatchNorm's features) and 'norm' (a LayerNorm's or GroupNorm's channels).

A new layer type is one ``register_resize(MyLayer)`` on a class with three static methods: ``sizes(m)``
(current length of each dimension it has), ``saved_sizes(m, name, state)`` (the lengths the tensors in
``state`` give) and ``keep(m, dim, idx)`` (keep indices ``idx`` along ``dim``, in place).
"""
from __future__ import annotations

import torch
from torch import nn

RESIZERS: dict[type, type] = {}


def register_resize(*layer_types: type | str):
    """Decorator: ``handler`` resizes these layer types (or dotted class paths of an optional package's types,
    e.g. ``"transformers.pytorch_utils.Conv1D"``)."""
    def deco(handler: type) -> type:
        for t in layer_types:
            RESIZERS[t] = handler
        return handler
    return deco


def resizer(m: nn.Module):
    """The resize handler of ``m``'s type, looked up along its MRO; None if there is none."""
    for k in type(m).__mro__:
        handler = RESIZERS.get(k) or RESIZERS.get(f"{k.__module__}.{k.__qualname__}")
        if handler is not None:
            return handler
    return None


def _take(t: torch.Tensor | None, idx: torch.Tensor, axis: int = 0):
    if t is None:
        return None
    kept = t.detach().index_select(axis, idx).clone()
    return nn.Parameter(kept, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else kept


def _take_per_channel(m: nn.Module, idx: torch.Tensor, old: int) -> None:
    """A quantized twin's per-output-channel scales and zero points follow its rows."""
    for name in ("weight_scale", "weight_zero_point"):
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == old:
            setattr(m, name, _take(t, idx))


def _depthwise(m: nn.Module) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


@register_resize(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvResize:
    @staticmethod
    def sizes(m) -> dict[str, int]:
        if _depthwise(m):
            return {"dw": m.out_channels}
        return {"out": m.out_channels, "in": m.in_channels} if m.groups == 1 else {}

    @staticmethod
    def saved_sizes(m, name: str, state: dict) -> dict[str, int]:
        w = state.get(f"{name}.weight")
        if w is None or w.ndim != m.weight.ndim:
            return {}
        if _depthwise(m):
            return {"dw": w.shape[0]}
        return {"out": w.shape[0], "in": w.shape[1]} if m.groups == 1 else {}

    @staticmethod
    def keep(m, dim: str, idx: torch.Tensor) -> None:
        with torch.no_grad():
            if dim in ("out", "dw"):
                _take_per_channel(m, idx, m.out_channels)
                m.weight, m.bias = _take(m.weight, idx), _take(m.bias, idx)
                m.out_channels = len(idx)
                if dim == "dw":
                    m.in_channels = m.groups = len(idx)
            else:
                m.weight = _take(m.weight, idx, 1)
                m.in_channels = len(idx)


@register_resize(nn.Linear)
class LinearResize:
    @staticmethod
    def sizes(m) -> dict[str, int]:
        return {"out": m.out_features, "in": m.in_features}

    @staticmethod
    def saved_sizes(m, name: str, state: dict) -> dict[str, int]:
        w = state.get(f"{name}.weight")
        return {"out": w.shape[0], "in": w.shape[1]} if w is not None and w.ndim == 2 else {}

    @staticmethod
    def keep(m, dim: str, idx: torch.Tensor) -> None:
        with torch.no_grad():
            if dim == "out":
                _take_per_channel(m, idx, m.out_features)
                m.weight, m.bias = _take(m.weight, idx), _take(m.bias, idx)
                m.out_features = len(idx)
            else:
                m.weight = _take(m.weight, idx, 1)
                m.in_features = len(idx)


@register_resize("transformers.pytorch_utils.Conv1D")
class TransposedLinearResize:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored [in, out], with ``nf`` output features."""

    @staticmethod
    def sizes(m) -> dict[str, int]:
        return {"out": m.weight.shape[1], "in": m.weight.shape[0]}

    @staticmethod
    def saved_sizes(m, name: str, state: dict) -> dict[str, int]:
        w = state.get(f"{name}.weight")
        return {"out": w.shape[1], "in": w.shape[0]} if w is not None and w.ndim == 2 else {}

    @staticmethod
    def out_rows(m) -> torch.Tensor:
        return m.weight.t()

    @staticmethod
    def keep(m, dim: str, idx: torch.Tensor) -> None:
        with torch.no_grad():
            if dim == "out":
                m.weight, m.bias = _take(m.weight, idx, 1), _take(m.bias, idx)
                m.nf = len(idx)
            else:
                m.weight = _take(m.weight, idx, 0)
            if hasattr(m, "nx"):
                m.nx = m.weight.shape[0]


@register_resize(nn.modules.batchnorm._BatchNorm)
class BatchNormResize:
    @staticmethod
    def sizes(m) -> dict[str, int]:
        return {"bn": m.num_features}

    @staticmethod
    def saved_sizes(m, name: str, state: dict) -> dict[str, int]:
        t = state.get(f"{name}.running_mean", state.get(f"{name}.weight"))
        return {"bn": t.shape[0]} if t is not None else {}

    @staticmethod
    def keep(m, dim: str, idx: torch.Tensor) -> None:
        with torch.no_grad():
            if m.affine:
                m.weight, m.bias = _take(m.weight, idx), _take(m.bias, idx)
            if m.track_running_stats:
                m.running_mean, m.running_var = _take(m.running_mean, idx), _take(m.running_var, idx)
            m.num_features = len(idx)


@register_resize(nn.LayerNorm)
class LayerNormResize:
    """A LayerNorm over the last axis only (``normalized_shape`` of one dimension)."""

    @staticmethod
    def sizes(m) -> dict[str, int]:
        return {"norm": m.normalized_shape[0]} if len(m.normalized_shape) == 1 else {}

    @staticmethod
    def saved_sizes(m, name: str, state: dict) -> dict[str, int]:
        t = state.get(f"{name}.weight")
        return {"norm": t.shape[0]} if t is not None and len(m.normalized_shape) == 1 else {}

    @staticmethod
    def keep(m, dim: str, idx: torch.Tensor) -> None:
        with torch.no_grad():
            m.weight, m.bias = _take(m.weight, idx), _take(m.bias, idx)
            m.normalized_shape = (len(idx),)


@register_resize(nn.GroupNorm)
class GroupNormResize:
    """A GroupNorm keeps its number of groups: the channels kept must be a multiple of it."""

    @staticmethod
    def sizes(m) -> dict[str, int]:
        return {"norm": m.num_channels}

    @staticmethod
    def saved_sizes(m, name: str, state: dict) -> dict[str, int]:
        t = state.get(f"{name}.weight")
        return {"norm": t.shape[0]} if t is not None else {}

    @staticmethod
    def keep(m, dim: str, idx: torch.Tensor) -> None:
        with torch.no_grad():
            m.weight, m.bias = _take(m.weight, idx), _take(m.bias, idx)
            m.num_channels = len(idx)


def fit_shapes(model: nn.Module, state: dict) -> None:
    """Resize every layer with a resize handler to the shapes in ``state`` (a channel-pruned model saved
    from the same architecture): the file's shapes are the truth, the factory's the starting point."""
    for name, m in model.named_modules():
        handler = resizer(m)
        if handler is None:
            continue
        now = handler.sizes(m)
        for dim, n in handler.saved_sizes(m, name, state).items():
            if dim in now and n != now[dim] and n > 0:
                handler.keep(m, dim, torch.arange(n) % now[dim])    # values are loaded from the file next
    from smallify.prune.hf import sync_modules

    sync_modules(model)          # attributes that mirror the shapes (a Hugging Face attention's head count)
