"""Residual-branch removal: the structured pruning step below one channel.

A residual connection ``y = shortcut + branch(x)`` keeps working when the branch is taken out: ``y =
shortcut``. Channel pruning cannot do that (a branch keeps at least one channel per layer, and on CPU runtimes
small layers cost a fixed per-kernel time whatever their width), so removing whole branches is how a ResNet
loses its per-layer overhead, not only its MACs.

``find_branches`` lists the removable branches of a traced model: an addition whose one operand depends only
on the other operand's inputs through nodes used nowhere else (the branch), with the kept operand already of
the sum's shape. ``remove_branches`` rewrites the torch.fx graph: the sum becomes the kept operand, a ReLU
applied to a tensor that is already a ReLU output is dropped, and the branch's layers leave the module (the
result is a ``torch.fx.GraphModule``; every remaining layer keeps its qualified name, so state dicts match).
``choose_branches`` ranks the branches by how much removing each one alone changes the model's output per MAC
it saves (relative squared error on calibration data) and removes the lowest.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from smallify.data import first_batches, inputs_and_labels
from smallify.errors import ConfigError, DataError, ModelError
from smallify.measure.macs import count_macs
from smallify.progress import track
from smallify.prune.graph import trace

ADVICE = "make the forward traceable to find its residual branches"

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
RELU_FUNCTIONS = {F.relu, torch.relu}


@dataclass
class Branch:
    """The operand ``drop`` of the sum node ``add`` (0 or 1) and the layers only it uses."""

    add: str
    drop: int
    modules: list[str]

    def key(self) -> list:
        return [self.add, self.drop]


def _is_add(n: fx.Node) -> bool:
    two = len(n.args) >= 2 and all(isinstance(a, fx.Node) for a in n.args[:2]) and not n.kwargs.get("alpha")
    return two and ((n.op == "call_function" and n.target in ADD_FUNCTIONS) or
                    (n.op == "call_method" and n.target in ("add", "add_")))


def _is_relu(n: fx.Node, modules: dict) -> bool:
    if n.op == "call_module":
        return isinstance(modules.get(n.target), nn.ReLU)
    return (n.op == "call_function" and n.target in RELU_FUNCTIONS) or (n.op == "call_method" and n.target == "relu")


def _ancestors(n: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [n]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(m.all_input_nodes)
    return seen


def _shape(n: fx.Node):
    meta = n.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def find_branches(model: nn.Module, example_inputs) -> list[Branch]:
    """The removable residual branches of ``model`` (see the module's docstring)."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = trace(copy.deepcopy(model).eval(), ADVICE)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    modules = dict(gm.named_modules())
    found = []
    for n in gm.graph.nodes:
        if not _is_add(n) or _shape(n) is None:
            continue
        options = []
        for drop in (0, 1):
            keep_node, drop_node = n.args[1 - drop], n.args[drop]
            if _shape(keep_node) != _shape(n):
                continue
            branch = _ancestors(drop_node) - _ancestors(keep_node)
            if not branch or any(b.op == "placeholder" for b in branch):
                continue
            if any(u not in branch and u is not n for b in branch for u in b.users):
                continue
            names = sorted({b.target for b in branch if b.op == "call_module"})
            params = sum(p.numel() for name in names for p in modules[name].parameters())
            if params:
                options.append((params, Branch(n.name, drop, names)))
        if options:        # a shortcut with its own layers (downsample) is the lighter side: keep it
            found.append(max(options, key=lambda o: o[0])[1])
    return found


def remove_branches(model: nn.Module, branches: list) -> fx.GraphModule:
    """A GraphModule of ``model`` without the given branches (``Branch`` or ``[add, drop]`` pairs, as the
    manifest of a saved model records them)."""
    gm = trace(copy.deepcopy(model), ADVICE)
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    keys = [b.key() if isinstance(b, Branch) else list(b) for b in branches]
    for add, drop in keys:
        n = nodes.get(add)
        if n is None or not _is_add(n) or drop not in (0, 1):
            raise ModelError(f"the model has no residual sum {add!r} (operand {drop}) to remove; is it the "
                             "architecture the pruned model was made from?")
        keep = n.args[1 - drop]
        n.replace_all_uses_with(keep)
        gm.graph.erase_node(n)
        if _is_relu(keep, modules):
            for u in list(keep.users):
                if _is_relu(u, modules):       # relu(relu(x)) == relu(x)
                    u.replace_all_uses_with(keep)
                    gm.graph.erase_node(u)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta["smallify_removed_branches"] = removed_branches(model) + keys
    return gm


def removed_branches(model: nn.Module) -> list[list]:
    """The ``[add, drop]`` pairs removed from ``model`` so far (what ``remove_branches`` rebuilds it from)."""
    meta = getattr(model, "meta", None)
    return [list(k) for k in meta.get("smallify_removed_branches", [])] if isinstance(meta, dict) else []


@torch.no_grad()
def choose_branches(model: nn.Module, count: int, example_inputs, data, limit: int = 512,
                    progress: bool = False) -> tuple[list[dict], list[Branch]]:
    """The ``count`` branches whose removal, each alone, adds the least relative squared output error per MAC
    it saves, on up to ``limit`` samples of ``data``. (Scored one at a time against the whole model: on the
    bundled ResNet a greedy, one-after-the-other choice took out a last-stage block whose loss fine-tuning
    recovers worse.) Returns one record per removed branch and the branches, lowest score first."""
    if count <= 0:
        return [], []
    if data is None:
        raise DataError("removing residual branches needs data= (calibration inputs) to rank them")
    batches = [inputs_and_labels(b)[0] for b in first_batches(data, limit)]
    if not batches:
        raise DataError("data= holds no samples")
    candidates = find_branches(model, example_inputs)
    if count > len(candidates):
        raise ConfigError(f"branches={count} but {type(model).__name__} has {len(candidates)} removable residual "
                          f"branch(es); accepted: 0..{len(candidates)}")
    model = copy.deepcopy(model).eval()
    reference = [model(x) for x in batches]
    power = sum(float((r ** 2).sum()) for r in reference)
    macs0 = count_macs(model, example_inputs)
    scored = []
    for c in track(candidates, "ranking residual branches", progress):
        trial = remove_branches(model, [c]).eval()
        err = sum(float(((trial(x) - r) ** 2).sum()) for x, r in zip(batches, reference)) / max(power, 1e-30)
        saved = 1 - count_macs(trial, example_inputs) / macs0
        scored.append((err / max(saved, 1e-9), c, err, saved))
    scored.sort(key=lambda t: t[0])
    chosen = scored[:count]
    records = [{"branch": c.add, "layers": c.modules, "output_error": err, "macs_saved": saved}
               for _, c, err, saved in chosen]
    return records, [c for _, c, _, _ in chosen]
