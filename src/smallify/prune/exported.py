"""The dependency graph of models torch.fx cannot trace (Hugging Face BERT, GPT-2, Llama), from torch.export.

``torch.export`` runs the model on its example inputs and records an ATen graph: every operation, with the
module it ran in (``nn_module_stack``) and, through the graph signature, which placeholders are parameters.
``module_graph`` folds the ATen operations of every layer that has a handler (Linear, transformers' Conv1D,
LayerNorm, ...) back into one ``call_module`` node, turns parameters into ``get_attr`` nodes, and keeps the
rest as ATen calls, each with its output shape. The same builder and handler table as the fx path then read
it: the ATen element-wise operations below pass or merge channels, views and attention freeze what they
touch, and anything unknown freezes its inputs with its name. In a transformer block this finds the FFN
neurons (fc1 -> act -> fc2, and gate * up -> down for gated MLPs) while the residual width stays frozen
(embeddings, norms over it, and the model output all read it).
"""
from __future__ import annotations

import types

import torch
from torch import fx, nn

from smallify.errors import ModelError
from smallify.prune.graph import Builder, Segment, module_handler, register_handler
from smallify.prune.handlers import linear_handler, merge_handler, pass_handler

aten = torch.ops.aten

PASS_ATEN = [aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
             aten.neg.default, aten.pow.Tensor_Scalar, aten.dropout.default, aten.clone.default,
             aten.contiguous.default, aten.alias.default, aten.detach.default, aten.to.dtype,
             aten.to.dtype_layout, aten._to_copy.default, aten.hardtanh.default, aten.leaky_relu.default,
             aten.elu.default, aten.hardswish.default, aten.hardsigmoid.default, aten.erf.default, aten.exp.default,
             aten.relu6.default if hasattr(aten, "relu6") else aten.relu.default]
MERGE_ATEN = [aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.add_.Tensor,
              aten.mul_.Tensor]
NO_OUTPUT_ATEN = [aten._assert_tensor_metadata.default]

register_handler(*PASS_ATEN)(pass_handler)
register_handler(*MERGE_ATEN)(merge_handler)


@register_handler(*NO_OUTPUT_ATEN)
def _no_output(b: Builder, n: fx.Node, target):
    return None


@register_handler("transformers.pytorch_utils.Conv1D")
def _conv1d_transposed(b: Builder, n: fx.Node, m: nn.Module):
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored [in, out]."""
    m.in_features, m.out_features = m.weight.shape       # what the Linear handler reads
    try:
        return linear_handler(b, n, m)
    finally:
        del m.in_features, m.out_features


def _meta(val):
    if isinstance(val, torch.Tensor):
        return types.SimpleNamespace(shape=tuple(val.shape), dtype=val.dtype)
    if isinstance(val, (tuple, list)):
        return [_meta(v) for v in val]
    return None


def _owner(n: fx.Node, model: nn.Module):
    """The outermost module with a graph handler that ``n`` ran in (its name and the call's key), or None."""
    for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if module_handler(m) is not None:
            return path, key
    return None


def export(model: nn.Module, inputs: tuple, fx_error: Exception):
    """``torch.export`` of ``model`` on ``inputs`` (caches off: Hugging Face models return them otherwise)."""
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    try:
        if cache:
            config.use_cache = False
        return torch.export.export(model, inputs, strict=False)
    except Exception as e:
        raise ModelError(f"{fx_error}; torch.export cannot capture it either ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        if cache:
            config.use_cache = cache


def module_graph(model: nn.Module, inputs: tuple, fx_error: Exception) -> fx.Graph:
    """An fx graph of ``model`` at the level the handlers read: one ``call_module`` node per layer with a handler
    (its ATen operations folded, when they read one tensor and give one), ATen calls elsewhere, and every node's
    output shape in ``meta['tensor_meta']``."""
    ep = export(model, inputs, fx_error)
    sig = ep.graph_signature
    weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
               **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    src = ep.graph_module.graph
    region: dict[fx.Node, tuple[str, str]] = {}
    for n in src.nodes:
        if n.op == "call_function":
            owner = _owner(n, model)
            if owner is not None:
                region[n] = owner
    members: dict[tuple[str, str], list[fx.Node]] = {}
    for n, r in region.items():
        members.setdefault(r, []).append(n)
    folded: dict[fx.Node, tuple[str, fx.Node]] = {}      # region output -> (module, its one input)
    inside: set[fx.Node] = set()
    for (path, _), nodes in members.items():
        body = set(nodes)
        ins = list(dict.fromkeys(a for x in nodes for a in x.all_input_nodes
                                 if a not in body and not (a.op == "placeholder" and a.name in weights)))
        outs = [x for x in nodes if any(u not in body for u in x.users)]
        if len(ins) == 1 and len(outs) == 1 and isinstance(outs[0].meta.get("val"), torch.Tensor):
            folded[outs[0]] = (path, ins[0])
            inside |= body
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in src.nodes:
        if n.op == "placeholder":
            new = g.get_attr(weights[n.name]) if n.name in weights else g.placeholder(n.name)
        elif n in folded:
            path, x = folded[n]
            new = g.call_module(path, (env[x],))
        elif n in inside:
            continue
        else:
            new = g.node_copy(n, lambda a: env[a])
        new.meta["tensor_meta"] = _meta(n.meta.get("val"))
        env[n] = new
    return g
