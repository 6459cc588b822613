"""The built-in handlers of the dependency graph's op table (``graph.register_handler``): one small function
per layer type, function or method, ``fn(builder, node, target) -> the output's channel layout``."""
from __future__ import annotations

from typing import Callable

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from smallify.prune.graph import (MERGE_FUNCTIONS, MERGE_METHODS, PASS_FUNCTIONS, PASS_METHODS, PASS_MODULES, Builder,
                                  Handler, segment_cuts, flatten_layout, SplitParts, same_segments, register_handler, group_segments)


@register_handler(nn.Conv1d, nn.Conv2d)
def _conv(b: Builder, n: fx.Node, m: nn.Module):
    in_lay = b.input_layout(n)
    if b.axis_of(n.all_input_nodes[0]) != 1:
        b.freeze(in_lay, f"{n.target}: its input's channels are not on axis 1")
        in_lay = None
    if m.groups == 1:
        b.add_slots(in_lay, n.target, "in")
        return b.produce(n, n.target, m.out_channels, axis=1)
    if m.groups == m.in_channels == m.out_channels and in_lay is not None:
        b.add_slots(in_lay, n.target, "dw")
        b.axis[n] = 1
        return in_lay
    b.freeze(in_lay, f"grouped convolution {n.target} (groups={m.groups})")
    return b.new_layout(n, f"grouped convolution {n.target}", axis=1)


@register_handler(nn.Linear)
def linear_handler(b: Builder, n: fx.Node, m: nn.Linear):
    in_lay, x = b.input_layout(n), n.all_input_nodes[0]
    s = b.shape(x)
    if in_lay is not None and s is not None and b.axis_of(x) == len(s) - 1 \
            and sum(seg.size * seg.factor for seg in in_lay) == m.in_features:
        b.add_slots(in_lay, n.target, "in")
    else:
        b.freeze(b.layout.get(x), f"{n.target}: input features do not map to channels")
    return b.produce(n, n.target, m.out_features)


def _norm(dim: str, axis_ok: Callable[[nn.Module, int, int], bool]) -> Handler:
    def handler(b: Builder, n: fx.Node, m: nn.Module):
        in_lay, x = b.input_layout(n), n.all_input_nodes[0]
        s = b.shape(x)
        if in_lay is None or s is None or not axis_ok(m, b.axis_of(x), len(s)):
            return b.unknown(n, f"module {n.target} ({type(m).__name__}) normalizes across the channel axis")
        b.add_slots(in_lay, n.target, dim)
        if isinstance(m, nn.GroupNorm):
            for seg in in_lay:
                b.spaces.multiple[b.spaces.find(seg.space)] = m.num_groups
            if len(in_lay) > 1:
                b.freeze(in_lay, f"{n.target}: GroupNorm over concatenated channels")
        return b.pass_through(n)
    return handler


register_handler(nn.BatchNorm1d, nn.BatchNorm2d)(_norm("bn", lambda m, axis, ndim: axis == 1))
register_handler(nn.GroupNorm)(_norm("norm", lambda m, axis, ndim: axis == 1))
register_handler(nn.LayerNorm)(_norm("norm", lambda m, axis, ndim: len(m.normalized_shape) == 1 and axis == ndim - 1))


@register_handler(*PASS_MODULES, *PASS_FUNCTIONS, *PASS_METHODS, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                  F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d)
def pass_handler(b: Builder, n: fx.Node, target):
    return b.pass_through(n)


@register_handler(*MERGE_FUNCTIONS, *MERGE_METHODS)
def merge_handler(b: Builder, n: fx.Node, fn):
    """``a + b``, ``a * b``: both sides' channels are one group (layouts split to a common refinement)."""
    args = [a for a in n.args if isinstance(a, fx.Node)]
    spaces = b.spaces
    lays = [spaces.expand(b.layout.get(a)) if isinstance(b.layout.get(a), list) else None for a in args]
    if len(lays) == 1:
        return b.pass_through(n)
    axes = {b.axis_of(a) for a in args}
    if all(lay is not None for lay in lays) and len(axes) == 1 and not same_segments(lays) and \
            len({sum(s.size for s in lay) for lay in lays}) == 1 and all(s.factor == 1 for lay in lays for s in lay):
        cuts = sorted({c for lay in lays for c in segment_cuts(lay)})
        refined = [spaces.refine(lay, cuts) for lay in lays]
        lays = refined if all(r is not None for r in refined) else lays
    if all(lay is not None for lay in lays) and len(axes) == 1 and same_segments(lays):
        for segs in zip(*lays):
            for s in segs[1:]:
                spaces.union(segs[0].space, s.space)
        b.axis[n] = axes.pop()
        return lays[0]
    for lay in lays:
        b.freeze(lay, f"{n.name}: operands with different channel layouts")
    return b.new_layout(n, f"{n.name}")


@register_handler(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax")
def _reduce(b: Builder, n: fx.Node, fn):
    """A reduction over other axes than the channel axis (global pooling: ``x.mean((2, 3))``) keeps the channels."""
    x = n.args[0]
    s, axis, lay = b.shape(x), b.axis_of(x), b.input_layout(n)
    dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    name = fn if isinstance(fn, str) else fn.__name__
    if s is None or axis is None or lay is None or dims is None:
        return b.unknown(n, f"operation {name} ({n.name})")
    dims = {d % len(s) for d in ((dims,) if isinstance(dims, int) else dims)}
    if axis in dims:
        return b.unknown(n, f"operation {name} ({n.name}) over the channel axis")
    keepdim = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
    b.axis[n] = axis if keepdim else axis - sum(d < axis for d in dims)
    return lay


@register_handler(torch.cat)
def _cat(b: Builder, n: fx.Node, fn):
    tensors = n.args[0]
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    s = b.shape(n)
    axis = b.axis_of(tensors[0]) if tensors else None
    if s is None or axis is None or dim not in (axis, axis - len(s)):
        return b.unknown(n, f"operation cat ({n.name})")
    lays = [b.spaces.expand(b.layout.get(a)) if isinstance(b.layout.get(a), list) else None for a in tensors]
    if any(lay is None for lay in lays) or {b.axis_of(a) for a in tensors} != {axis}:
        return b.unknown(n, f"operation cat ({n.name})")
    b.axis[n] = axis
    return [seg for lay in lays for seg in lay]


@register_handler(torch.split, torch.chunk, "split", "chunk")
def _split(b: Builder, n: fx.Node, fn):
    """``chunk(k)`` on the channel axis: part i's channel j and part i' channel j are removed together (one
    group), so that the parts stay equal and ``chunk`` still cuts them apart. ``split`` on the channel axis
    freezes (its sizes are constants of ``forward``). On another axis every part keeps the input's channels."""
    x = n.args[0]
    s, axis, lay = b.shape(x), b.axis_of(x), b.input_layout(n)
    name = fn if isinstance(fn, str) else fn.__name__
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    count = len(n.meta.get("tensor_meta") or ()) or 1
    if s is None or lay is None or axis is None:
        return b.unknown(n, f"operation {name} ({n.name})")
    b.axis[n] = axis
    if dim not in (axis, axis - len(s)):
        return SplitParts([lay] * count)
    total = s[axis]
    if name != "chunk" or total % count or any(seg.factor != 1 for seg in lay):
        return b.unknown(n, f"{name} ({n.name}) into parts of fixed sizes on the channel axis (the sizes are "
                            "constants of forward; chunk(k) into equal parts is pruned)")
    part = total // count
    refined = b.spaces.refine(lay, [part * i for i in range(1, count)])
    if refined is None:
        return b.unknown(n, f"operation {name} ({n.name}): its cuts split merged channel groups")
    parts = group_segments(refined, [part] * count)
    if not same_segments(parts):
        return b.unknown(n, f"operation {name} ({n.name}): its parts have different channel layouts")
    for segs in zip(*parts):
        for seg in segs[1:]:
            b.spaces.union(segs[0].space, seg.space)
    return SplitParts(parts)


@register_handler(operator.getitem)
def _getitem(b: Builder, n: fx.Node, fn):
    src, index = n.args[0], n.args[1]
    lay = b.layout.get(src)
    if isinstance(lay, SplitParts) and isinstance(index, int):
        b.axis[n] = b.axis.get(src, b.axis_of(n))
        return lay.parts[index]
    return b.unknown(n, f"operation getitem ({n.name})")


@register_handler(torch.flatten, "flatten", "view", "reshape")
def _reshape(b: Builder, n: fx.Node, fn):
    x = n.all_input_nodes[0]
    if b.shape(x) is not None and b.shape(x) == b.shape(n):
        return b.pass_through(n)
    if b.axis_of(x) != 1 and b.shape(x) is not None and len(b.shape(x)) > 2:
        return b.unknown(n, f"reshape {n.name} of channels not on axis 1")
    return flatten_layout(b.input_layout(n), b.shape(x), b.shape(n), b.freeze, n)
