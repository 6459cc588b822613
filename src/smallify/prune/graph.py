"""The channel dependency graph: which layer dimensions must shrink together when channels are removed.

The model is traced with torch.fx and run once on the example inputs (shapes). Every tensor's channel axis
(axis 1 of feature maps, the last axis of Linear inputs) gets a *layout*: a list of segments, each a slice of
a channel *space*. A Conv2d/Linear creates a space (its output channels); BatchNorm, activations, pooling
and dropout pass it through; ``a + b`` (residual connections) and ``a * b`` merge the spaces of both sides;
``torch.cat`` on channels concatenates layouts; a depthwise convolution keeps its input's space (its groups
shrink with it); flattening a feature map makes each channel a block of H*W features for the next Linear.
Merged spaces form a *group*: one set of channel indices removed from every slot of the group at once.
Spaces that reach the model's output, come from its inputs, belong to ignored layers, or pass through an
operation the rules do not know are frozen; the graph says which operation froze what.

The rules are an open table (``register_handler``): a module type (along its MRO), function or method name
maps to a small handler that reads its inputs' layouts and returns its output's. Built in: Conv1d/Conv2d
(depthwise too), Linear, BatchNorm, GroupNorm (channels kept in multiples of its groups), LayerNorm over the
channel axis, element-wise and pooling ops, reductions over other axes, cat, chunk (the parts pruned alike),
flatten/reshape. Each layout knows its channel axis (1 for Conv1d's [N, C, L], the last for Linear's).
Layer types with a handler are kept whole by the tracer; how each one shrinks is ``resize.py``.
A model torch.fx cannot trace (Hugging Face transformers) is read through torch.export instead
(``exported.py``: the same node shapes, with ATen handlers for attention heads).
"""
from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from smallify.errors import ModelError

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.hardswish,
                  F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                  torch.nn.functional.leaky_relu, operator.neg}
PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float"}
MERGE_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, operator.sub, torch.sub, operator.iadd}
MERGE_METHODS = {"add", "mul", "sub", "add_", "mul_"}


@dataclass
class Segment:
    space: int
    size: int
    factor: int = 1        # features per channel (Linear after flatten: H*W)


@dataclass
class Slot:
    """Where a space appears: ``module``'s ``dim`` ('out', 'in', 'bn' or 'dw'), at channel ``offset``."""

    module: str
    dim: str
    offset: int = 0
    factor: int = 1


@dataclass
class Group:
    """Channels that are removed together: ``size`` channels, present in every slot."""

    id: int
    size: int
    slots: list[Slot] = field(default_factory=list)
    frozen: str | None = None          # why it cannot be pruned, or None
    multiple: int = 1                  # channels are kept in multiples of this (a GroupNorm's groups)

    @property
    def producers(self) -> list[str]:
        return list(dict.fromkeys(s.module for s in self.slots if s.dim == "out"))     # GPT-2's c_attn: 3 slots

    def describe(self) -> str:
        return f"group {self.id}: {self.size} channels of {', '.join(self.producers) or '(no producer)'}"


class _Spaces:
    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}
        self.slots: dict[int, list[Slot]] = {}
        self.alias: dict[int, list[int]] = {}
        self.multiple: dict[int, int] = {}

    def new(self, size: int, frozen: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(size)
        if frozen:
            self.frozen[i] = frozen
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a

    def freeze(self, i: int, why: str) -> None:
        self.frozen.setdefault(i, why)

    def split(self, i: int, k: int) -> bool:
        """Split an unmerged space into its first ``k`` channels and the rest (slots split with it)."""
        if self.find(i) != i or any(self.parent[j] == i for j in range(len(self.parent)) if j != i):
            return False
        a, b = self.new(k, self.frozen.get(i)), self.new(self.size[i] - k, self.frozen.get(i))
        for slot in self.slots.pop(i, []):
            self.slots.setdefault(a, []).append(Slot(slot.module, slot.dim, slot.offset, slot.factor))
            self.slots.setdefault(b, []).append(Slot(slot.module, slot.dim, slot.offset + k * slot.factor, slot.factor))
        self.alias[i] = [a, b]
        return True

    def expand(self, lay):
        """A layout with split spaces replaced by their parts."""
        if lay is None:
            return None
        out = []
        for seg in lay:
            if seg.space in self.alias:
                a, b = self.alias[seg.space]
                out += self.expand([Segment(a, self.size[a], seg.factor), Segment(b, self.size[b], seg.factor)])
            else:
                out.append(seg)
        return out

    def refine(self, lay, cuts: list[int]):
        """Split spaces so that the layout has a boundary at every cut (channel positions); None if it cannot."""
        lay = self.expand(lay)
        pos, out = 0, []
        for seg in lay:
            inner = [c - pos for c in cuts if pos < c < pos + seg.size]
            if inner:
                if not self.split(seg.space, inner[0]):
                    return None
                return self.refine(lay, cuts)
            out.append(seg)
            pos += seg.size
        return out


@dataclass
class DependencyGraph:
    model: nn.Module
    groups: list[Group]
    modules: dict[str, nn.Module]

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.frozen is None and g.producers]


def _channel_axis(shape) -> int | None:
    if shape is None or len(shape) < 2:
        return None
    return 1 if len(shape) == 4 else len(shape) - 1


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every module type that has a handler kept as one node (users' layers too)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return module_handler(m) is not None or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, advice: str) -> fx.GraphModule:
    """``model`` as a torch.fx GraphModule (itself if it is one); a ModelError naming the failing operation
    and ``advice`` otherwise."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as e:
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); {advice}") from None


class Builder:
    """What a handler sees while the graph is built: the spaces, each node's layout (``layout``: segments
    along the node's channel axis, ``axis``), and helpers. A handler ``fn(builder, node, target)`` (target:
    the module, the function, or the method name) returns the node's layout (None: no channel axis)."""

    def __init__(self, modules: dict[str, nn.Module], ignore: tuple[str, ...]):
        self.modules, self.ignore = modules, ignore
        self.spaces = _Spaces()
        self.layout: dict[fx.Node, object] = {}
        self.axis: dict[fx.Node, int] = {}

    def shape(self, n) -> tuple | None:
        meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def axis_of(self, n: fx.Node) -> int | None:
        """The channel axis of ``n``'s output: set by its handler, else axis 1 of a feature map / the last."""
        s = self.shape(n)
        if n in self.axis:
            return self.axis[n] if s is None or self.axis[n] < len(s) else None
        return _channel_axis(s)

    def input_layout(self, n: fx.Node, i: int = 0):
        ins = n.all_input_nodes
        return self.spaces.expand(self.layout.get(ins[i])) if len(ins) > i and isinstance(self.layout.get(ins[i]), list) else None

    def new_layout(self, n, why: str | None = None, axis: int | None = None) -> list[Segment] | None:
        s = self.shape(n)
        axis = _channel_axis(s) if axis is None else axis
        if s is None or axis is None or axis >= len(s):
            return None
        self.axis[n] = axis
        return [Segment(self.spaces.new(s[axis], why), s[axis])]

    def freeze(self, lay, why: str) -> None:
        if isinstance(lay, SplitParts):
            for part in lay.parts:
                self.freeze(part, why)
            return
        for seg in self.spaces.expand(lay) or []:
            self.spaces.freeze(seg.space, why)

    def freeze_inputs(self, n: fx.Node, why: str) -> None:
        for a in n.all_input_nodes:
            self.freeze(self.layout.get(a), why)

    def add_slots(self, lay, module: str, dim: str) -> None:
        offset = 0
        for seg in lay or []:
            self.spaces.slots.setdefault(seg.space, []).append(Slot(module, dim, offset, seg.factor))
            offset += seg.size * seg.factor

    def produce(self, n: fx.Node, module: str, size: int, axis: int | None = None) -> list[Segment]:
        """A new space of ``size`` channels made by ``module``'s output ('out' slot)."""
        why = next((f"ignored ({p!r})" for p in self.ignore if fnmatch.fnmatchcase(module, p)), None)
        sid = self.spaces.new(size, why)
        self.spaces.slots[sid] = [Slot(module, "out")]
        if axis is not None:
            self.axis[n] = axis
        return [Segment(sid, size)]

    def pass_through(self, n: fx.Node):
        ins = n.all_input_nodes
        if ins and ins[0] in self.axis:
            self.axis[n] = self.axis[ins[0]]
        return self.input_layout(n)

    def unknown(self, n: fx.Node, what: str):
        self.freeze_inputs(n, what)
        return self.new_layout(n, what)


@dataclass
class SplitParts:
    """The layouts of a split's outputs, picked by ``getitem``."""
    parts: list


Handler = Callable[[Builder, fx.Node, object], object]
MODULE_HANDLERS: dict[type, Handler] = {}
FUNCTION_HANDLERS: dict[object, Handler] = {}     # call_function targets, and call_method names


def register_handler(*targets):
    """Decorator: ``fn(builder, node, target) -> layout`` handles these module types (looked up along the MRO;
    a dotted class path such as ``"transformers.pytorch_utils.Conv1D"`` names a type of an optional package),
    functions, or method names (strings). Users register their own layers the same way."""
    def deco(fn: Handler) -> Handler:
        for t in targets:
            if isinstance(t, type) and issubclass(t, nn.Module) or isinstance(t, str) and "." in t:
                MODULE_HANDLERS[t] = fn
            else:
                FUNCTION_HANDLERS[t] = fn
        return fn
    return deco


def module_handler(m: nn.Module) -> Handler | None:
    """The handler of ``m``'s type, along its MRO (by the type, or by its dotted class path)."""
    for k in type(m).__mro__[:-2]:
        fn = MODULE_HANDLERS.get(k) or MODULE_HANDLERS.get(f"{k.__module__}.{k.__qualname__}")
        if fn is not None:
            return fn
    return None


def _handler(n: fx.Node, modules: dict) -> tuple[Handler | None, object]:
    if n.op == "call_module":
        m = modules[n.target]
        return module_handler(m), m
    return FUNCTION_HANDLERS.get(n.target), n.target


def build(model: nn.Module, example_inputs, ignore: tuple[str, ...] = ()) -> DependencyGraph:
    """Trace ``model`` and group the layer dimensions that must be pruned together: each node goes to the
    handler of its module type, function or method (``register_handler``); unknown ones freeze their
    inputs' groups and say so."""
    from smallify.prune import exported, handlers  # noqa: F401  (the built-in handlers register themselves)

    model = model.eval()
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else {}      # a tokenizer's output
    inputs = () if kwargs else (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    advice = "make the forward traceable, or prune the traceable part and pass the rest's layer names in ignore="
    try:
        if kwargs:
            raise ModelError("keyword inputs: read through torch.export")
        gm = trace(model, advice)
    except ModelError as fx_error:      # torch.fx cannot trace it (Hugging Face models): torch.export's ATen graph
        graph = exported.module_graph(model, inputs, fx_error, kwargs)
    else:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
        graph = gm.graph
    modules = dict(model.named_modules())
    b = Builder(modules, tuple(ignore))
    for n in graph.nodes:
        if n.op == "placeholder":
            b.layout[n] = b.new_layout(n, "model input")
        elif n.op == "get_attr":
            b.layout[n] = None
        elif n.op == "output":
            for a in n.all_input_nodes:
                b.freeze(b.layout.get(a), "reaches the model output")
        else:
            handler, target = _handler(n, modules)
            if handler is not None:
                b.layout[n] = handler(b, n, target)
            elif n.op == "call_module":
                b.layout[n] = b.unknown(n, f"module {n.target} ({type(target).__name__})")
            else:
                b.layout[n] = b.unknown(n, f"operation {getattr(target, '__name__', str(target))} ({n.name})")
    spaces = b.spaces
    groups: dict[int, Group] = {}
    for sid in range(len(spaces.parent)):
        if sid in spaces.alias:
            continue
        root = spaces.find(sid)
        g = groups.setdefault(root, Group(len(groups), spaces.size[root]))
        g.slots += spaces.slots.get(sid, [])
        g.multiple = math.lcm(g.multiple, spaces.multiple.get(root, 1), spaces.multiple.get(sid, 1))
        if sid in spaces.frozen and g.frozen is None:
            g.frozen = spaces.frozen[sid]
    return DependencyGraph(model, [g for g in groups.values() if g.slots], modules)


def segment_cuts(lay) -> list[int]:
    """The channel offsets where a layout's segments meet (none for a single segment)."""
    pos, out = 0, []
    for seg in lay[:-1]:
        pos += seg.size
        out.append(pos)
    return out


def group_segments(refined, sizes) -> list[list]:
    """Consecutive segments of ``refined`` gathered into parts of the given channel ``sizes`` (the cuts of a
    split or chunk; ``refined`` is a layout already cut at those boundaries)."""
    parts, i = [], 0
    for size in sizes:
        segs, filled = [], 0
        while filled < size:
            segs.append(refined[i])
            filled += refined[i].size
            i += 1
        parts.append(segs)
    return parts


def same_segments(lays) -> bool:
    """Whether the layouts have segments of the same sizes and factors, in the same order."""
    return all(len(lay) == len(lays[0]) and all(a.size == b.size and a.factor == b.factor for a, b in zip(lay, lays[0]))
               for lay in lays)


def _cat_on_channels(n: fx.Node, shape) -> bool:
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    s = shape(n)
    return s is not None and _channel_axis(s) is not None and dim in (_channel_axis(s), _channel_axis(s) - len(s))


def flatten_layout(in_lay, in_shape, out_shape, freeze, n):
    """[N, C, H, W] -> [N, C*H*W]: each channel becomes a block of H*W features."""
    if in_lay is None or in_shape is None or out_shape is None:
        return None
    if len(out_shape) == 2 and len(in_shape) >= 2 and out_shape[0] == in_shape[0]:
        per = 1
        for d in in_shape[2:]:
            per *= d
        return [Segment(s.space, s.size, s.factor * per) for s in in_lay]
    if tuple(out_shape) == tuple(in_shape):
        return in_lay
    freeze(in_lay, f"reshape {n.name} from {tuple(in_shape)} to {tuple(out_shape)}")
    return None
