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
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field

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

    @property
    def producers(self) -> list[str]:
        return [s.module for s in self.slots if s.dim == "out"]

    def describe(self) -> str:
        return f"group {self.id}: {self.size} channels of {', '.join(self.producers) or '(no producer)'}"


class _Spaces:
    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}
        self.slots: dict[int, list[Slot]] = {}
        self.alias: dict[int, list[int]] = {}

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


def trace(model: nn.Module, advice: str) -> fx.GraphModule:
    """``model`` as a torch.fx GraphModule (itself if it is one); a ModelError naming the failing operation
    and ``advice`` otherwise."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); {advice}") from None


def build(model: nn.Module, example_inputs, ignore: tuple[str, ...] = ()) -> DependencyGraph:
    """Trace ``model`` and group the layer dimensions that must be pruned together."""
    model = model.eval()
    gm = trace(model, "make the forward traceable, or prune the traceable part and pass the rest's layer names "
                      "in ignore=")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    modules = dict(model.named_modules())
    spaces = _Spaces()
    layout: dict[fx.Node, list[Segment] | None] = {}

    def shape(n) -> tuple | None:
        meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def new_layout(n, why: str | None = None) -> list[Segment] | None:
        s = shape(n)
        axis = _channel_axis(s)
        return None if axis is None else [Segment(spaces.new(s[axis], why), s[axis])]

    def freeze(lay, why: str) -> None:
        for seg in spaces.expand(lay) or []:
            spaces.freeze(seg.space, why)

    def add_slots(lay, module: str, dim: str) -> None:
        offset = 0
        for seg in lay or []:
            spaces.slots.setdefault(seg.space, []).append(Slot(module, dim, offset, seg.factor))
            offset += seg.size * seg.factor

    def ignored(name: str) -> str | None:
        return next((p for p in ignore if fnmatch.fnmatchcase(name, p)), None)

    for n in gm.graph.nodes:
        ins = [a for a in n.all_input_nodes]
        in_lay = spaces.expand(layout.get(ins[0])) if ins else None
        if n.op == "placeholder":
            layout[n] = new_layout(n, "model input")
        elif n.op == "get_attr":
            layout[n] = None
        elif n.op == "output":
            for a in ins:
                freeze(spaces.expand(layout.get(a)), "reaches the model output")
        elif n.op == "call_module":
            m = modules[n.target]
            if isinstance(m, nn.Conv2d):
                if m.groups == 1:
                    add_slots(in_lay, n.target, "in")
                    sid = spaces.new(m.out_channels, f"ignored ({ignored(n.target)!r})" if ignored(n.target) else None)
                    spaces.slots[sid] = [Slot(n.target, "out")]
                    layout[n] = [Segment(sid, m.out_channels)]
                elif m.groups == m.in_channels == m.out_channels and in_lay is not None:
                    add_slots(in_lay, n.target, "dw")
                    layout[n] = in_lay
                else:
                    freeze(in_lay, f"grouped convolution {n.target} (groups={m.groups})")
                    layout[n] = new_layout(n, f"grouped convolution {n.target}")
            elif isinstance(m, nn.Linear):
                if in_lay is not None and sum(s.size * s.factor for s in in_lay) == m.in_features:
                    add_slots(in_lay, n.target, "in")
                else:
                    freeze(in_lay, f"{n.target}: input features do not map to channels")
                sid = spaces.new(m.out_features, f"ignored ({ignored(n.target)!r})" if ignored(n.target) else None)
                spaces.slots[sid] = [Slot(n.target, "out")]
                layout[n] = [Segment(sid, m.out_features)]
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                add_slots(in_lay, n.target, "bn")
                layout[n] = in_lay
            elif isinstance(m, PASS_MODULES):
                layout[n] = in_lay
            elif isinstance(m, nn.Flatten):
                layout[n] = _flatten(in_lay, shape(ins[0]), shape(n), freeze, n)
            else:
                for a in ins:
                    freeze(layout.get(a), f"module {n.target} ({type(m).__name__})")
                layout[n] = new_layout(n, f"output of {n.target} ({type(m).__name__})")
        elif n.op in ("call_function", "call_method"):
            fn = n.target
            tensor_args = [a for a in n.args if isinstance(a, fx.Node)]
            if (n.op == "call_function" and fn in PASS_FUNCTIONS) or (n.op == "call_method" and fn in PASS_METHODS):
                layout[n] = in_lay
            elif (n.op == "call_function" and fn in MERGE_FUNCTIONS) or (n.op == "call_method" and fn in MERGE_METHODS):
                lays = [spaces.expand(layout.get(a)) for a in tensor_args]
                if len(lays) == 1:
                    layout[n] = lays[0]
                    continue
                if all(lay is not None for lay in lays) and not _same_segments(lays) and \
                        len({sum(s.size for s in lay) for lay in lays}) == 1 and \
                        all(s.factor == 1 for lay in lays for s in lay):
                    cuts = sorted({c for lay in lays for c in _cuts(lay)})
                    refined = [spaces.refine(lay, cuts) for lay in lays]
                    lays = refined if all(r is not None for r in refined) else lays
                if all(lay is not None for lay in lays) and _same_segments(lays):
                    for segs in zip(*lays):
                        for s in segs[1:]:
                            spaces.union(segs[0].space, s.space)
                    layout[n] = lays[0]
                else:
                    for lay in lays:
                        freeze(lay, f"{n.name}: operands with different channel layouts")
                    layout[n] = new_layout(n, f"{n.name}")
            elif n.op == "call_function" and fn is torch.cat and _cat_on_channels(n, shape):
                lays = [spaces.expand(layout.get(a)) for a in n.args[0]]
                layout[n] = None if any(lay is None for lay in lays) else [s for lay in lays for s in lay]
            elif (n.op == "call_function" and fn is torch.flatten) or (n.op == "call_method" and fn in ("flatten", "view", "reshape")):
                layout[n] = _flatten(in_lay, shape(ins[0]), shape(n), freeze, n)
            else:
                name = getattr(fn, "__name__", str(fn))
                for a in ins:
                    freeze(layout.get(a), f"operation {name} ({n.name})")
                layout[n] = new_layout(n, f"output of {name} ({n.name})")
    groups: dict[int, Group] = {}
    for sid in range(len(spaces.parent)):
        if sid in spaces.alias:
            continue
        root = spaces.find(sid)
        g = groups.setdefault(root, Group(len(groups), spaces.size[root]))
        g.slots += spaces.slots.get(sid, [])
        if sid in spaces.frozen and g.frozen is None:
            g.frozen = spaces.frozen[sid]
    return DependencyGraph(model, [g for g in groups.values() if g.slots], modules)


def _cuts(lay) -> list[int]:
    pos, out = 0, []
    for seg in lay[:-1]:
        pos += seg.size
        out.append(pos)
    return out


def _same_segments(lays) -> bool:
    return all(len(lay) == len(lays[0]) and all(a.size == b.size and a.factor == b.factor for a, b in zip(lay, lays[0]))
               for lay in lays)


def _cat_on_channels(n: fx.Node, shape) -> bool:
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    s = shape(n)
    return s is not None and _channel_axis(s) is not None and dim in (_channel_axis(s), _channel_axis(s) - len(s))


def _flatten(in_lay, in_shape, out_shape, freeze, n):
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
