"""Layers whose weight is a codebook lookup: ``weight = codebook[row, indices]`` (times a mask when pruned).

A layer of type T (Linear, Conv2d, Embedding) becomes ``Shared<T>``: the float layer's subclass with its weight
Parameter replaced by ``codebook`` (R, k) (k-means; a Parameter) or ``scale`` (R, 1) x fixed ``levels`` (L,)
(binary, ternary, power of two), an ``indices`` buffer (uint8, the weight's shape) and an optional ``mask``
(bool: pruned weights stay exactly zero). ``weight`` is computed on every access, so the float layer's own
forward runs unchanged and autograd gives each centroid the sum of its members' gradients (Deep Compression's
fine-tuning rule): ``smallify.train`` / ``distill`` learn the centroids while the indices stay.

Rows (``scope``): the weight viewed as (R, N): 'layer' (1, numel), 'channel' (out, numel / out), 'group'
(numel / g, g): consecutive weights of one output channel (for a Linear, input columns j*g .. (j+1)*g-1).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from smallify.errors import ConfigError


def rows_shape(shape: tuple[int, ...], scope: str, group_size: int | None) -> tuple[int, int]:
    """(R, N) of a weight of ``shape`` under ``scope``; ConfigError when the scope does not fit."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if scope == "layer":
        return 1, numel
    per_channel = numel // int(shape[0])
    if scope == "channel":
        return int(shape[0]), per_channel
    if group_size is None or per_channel % group_size:
        raise ConfigError(f"group_size={group_size} does not divide the {per_channel} weights of each output "
                          f"channel of a {tuple(shape)} weight; accepted: a divisor of {per_channel}, or "
                          "scope='channel'")
    return numel // group_size, group_size


def plain_layer(twin: nn.Module, params: tuple[str, ...], buffers: tuple[str, ...], attrs: tuple[str, ...]) -> nn.Module:
    """A copy of ``twin`` (a shared or hashed layer) as its plain ``float_type`` holding the expanded weight, its
    own ``params``, ``buffers`` and ``attrs`` dropped."""
    m = copy.copy(twin)
    m.__class__ = twin.float_type
    m._parameters = {"weight": nn.Parameter(twin.weight.detach().clone()),
                     **{k: v for k, v in twin._parameters.items() if k not in params}}
    m._buffers = {k: v for k, v in twin._buffers.items() if k not in buffers}
    m._non_persistent_buffers_set = twin._non_persistent_buffers_set - set(buffers)
    m._modules = dict(twin._modules)
    for attr in attrs:
        m.__dict__.pop(attr, None)
    return m


class SharedTwin:
    """Mixin of the shared layers; ``share`` records how the codebook was made (kind, scope, group size, k)."""

    float_type: type[nn.Module]

    @classmethod
    def build(cls, m: nn.Module, share: dict, indices: torch.Tensor, codebook: torch.Tensor | None = None,
              scale: torch.Tensor | None = None, levels: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> "SharedTwin":
        """The shared form of float layer ``m``: ``codebook`` (R, k), or ``scale`` (R, 1) and ``levels`` (L,);
        ``indices`` (R, N) or the weight's shape; ``mask`` (bool, the weight's shape) or None."""
        shape = tuple(m.weight.shape)
        new = copy.copy(m)
        new.__class__ = cls
        new._parameters = {k: v for k, v in m._parameters.items() if k != "weight"}
        new._buffers, new._modules = dict(m._buffers), dict(m._modules)
        new.weight_shape = shape
        new.share = dict(share)
        dev = m.weight.device
        if codebook is not None:
            new.codebook = nn.Parameter(codebook.detach().to(dev, torch.float32).clone())
        else:
            new.scale = nn.Parameter(scale.detach().to(dev, torch.float32).reshape(-1, 1).clone())
            new.register_buffer("levels", levels.detach().to(dev, torch.float32).clone())
        new.register_buffer("indices", indices.detach().to(dev, torch.uint8).reshape(shape).clone())
        new.register_buffer("mask", None if mask is None else mask.detach().to(dev, torch.bool).reshape(shape).clone())
        return new

    @property
    def rows(self) -> tuple[int, int]:
        return rows_shape(self.weight_shape, self.share["scope"], self.share.get("group_size"))

    def codebook_values(self) -> torch.Tensor:
        """(R, k): every scope's shared values (the k-means centroids, or scale x levels)."""
        if "codebook" in self._parameters:
            return self.codebook
        return self.scale * self.levels[None, :]

    @property
    def weight(self) -> torch.Tensor:
        r, n = self.rows
        w = self.codebook_values().gather(1, self.indices.reshape(r, n).long()).reshape(self.weight_shape)
        return w if self.mask is None else w * self.mask

    def to_float(self) -> nn.Module:
        """The plain float layer with the expanded weight (for export, or to drop the sharing)."""
        return plain_layer(self, ("codebook", "scale"), ("indices", "mask", "levels", "codebook_scale"),
                           ("weight_shape", "share"))

    def extra_repr(self) -> str:
        base = self.float_type.extra_repr(self)
        r, _ = self.rows
        return (f"{base}, {self.share['kind']}: {self.share['k']} values per {self.share['scope']} "
                f"({r} codebook(s)){', masked' if self.mask is not None else ''}")


class SharedLinear(SharedTwin, nn.Linear):
    float_type = nn.Linear


class SharedConv2d(SharedTwin, nn.Conv2d):
    float_type = nn.Conv2d


class SharedConv1d(SharedTwin, nn.Conv1d):
    float_type = nn.Conv1d


class SharedEmbedding(SharedTwin, nn.Embedding):
    float_type = nn.Embedding


# float layer type -> its shared twin, looked up along the layer's MRO (a subclass of Linear is a Linear)
TWINS: dict[type, type[SharedTwin]] = {nn.Linear: SharedLinear, nn.Conv2d: SharedConv2d, nn.Conv1d: SharedConv1d,
                                       nn.Embedding: SharedEmbedding}


def lookup(m: nn.Module, table: dict[type, type], twin_base: type) -> type | None:
    """The twin of ``m``'s type in ``table`` along its MRO; None for a twin already or a layer without weight."""
    if isinstance(m, twin_base) or not isinstance(getattr(m, "weight", None), torch.Tensor):
        return None
    return next((table[c] for c in type(m).__mro__ if c in table), None)


def twin_of(m: nn.Module) -> type[SharedTwin] | None:
    return lookup(m, TWINS, SharedTwin)


def expand(model: nn.Module) -> nn.Module:
    """``model`` with every shared layer replaced by its plain float layer (in place; returned)."""
    from smallify.quant.modules import replace_module

    for name, m in list(model.named_modules()):
        if isinstance(m, SharedTwin):
            replace_module(model, name, m.to_float())
    return model
