"""The dependency graph of models torch.fx cannot trace (Hugging Face BERT, GPT-2, Llama), from torch.export.

``torch.export`` runs the model on its example inputs and records an ATen graph: every operation, with the
module it ran in (``nn_module_stack``) and, through the graph signature, which placeholders are parameters.
``module_graph`` folds the ATen operations of every layer that has a handler (Linear, transformers' Conv1D,
LayerNorm, Embedding, ...) back into one ``call_module`` node, turns parameters into ``get_attr`` nodes, and
keeps the rest as ATen calls, each with its output shape. The same builder and handler table as the fx path
then read it, with the ATen handlers below: element-wise operations pass or merge channels (an operand
broadcast along the channel axis reads none: rotary cos/sin, a norm's 1/rms); a view of [.., C] into
[.., heads, head_dim] makes each head one channel of head_dim rows; transpose/unsqueeze/expand/slice move
the channel axis or work beside it; ``scaled_dot_product_attention`` makes head i of q, k and v one channel
(grouped-query attention: a key/value head and its query heads); merging heads back is the reader's input.
Anything unknown freezes its inputs with its name. In a transformer block this finds the FFN neurons
(fc1 -> act -> fc2, and gate * up -> down for gated MLPs) and the attention heads, while the residual width
stays frozen (embeddings, norms over it, and the model output all read it).
"""
from __future__ import annotations

import types

import torch
from torch import fx, nn

from smallify.errors import ModelError
from smallify.prune.graph import (Builder, group_segments, Segment, Slot, SplitParts, flatten_layout, module_handler,
                                  register_handler, same_segments)
from smallify.prune.handlers import linear_handler, pass_handler

aten = torch.ops.aten

PASS_ATEN = [aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
             aten.neg.default, aten.pow.Tensor_Scalar, aten.dropout.default, aten.clone.default,
             aten.contiguous.default, aten.alias.default, aten.detach.default, aten.to.dtype,
             aten.to.dtype_layout, aten._to_copy.default, aten.hardtanh.default, aten.leaky_relu.default,
             aten.elu.default, aten.hardswish.default, aten.hardsigmoid.default, aten.erf.default,
             aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.max_pool2d.default,
             aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default, aten.max_pool1d.default]
MERGE_ATEN = [aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.add_.Tensor,
              aten.mul_.Tensor]
NO_OUTPUT_ATEN = [aten._assert_tensor_metadata.default]

register_handler(*PASS_ATEN)(pass_handler)


@register_handler(*NO_OUTPUT_ATEN)
def _no_output(b: Builder, n: fx.Node, target):
    return None


@register_handler("transformers.pytorch_utils.Conv1D")
def _conv1d_transposed(b: Builder, n: fx.Node, m: nn.Module):
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored [in, out]."""
    features = m.weight.shape
    return linear_handler(b, n, types.SimpleNamespace(in_features=features[0], out_features=features[1]))


@register_handler(nn.Embedding)
def _embedding(b: Builder, n: fx.Node, m: nn.Embedding):
    """An embedding's width is the residual stream's: embedding tables are not resized, so it stays."""
    return b.new_layout(n, f"embedding {n.target}: the residual stream's width (embedding tables are not resized)")


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


def export(model: nn.Module, inputs: tuple, fx_error: Exception, kwargs: dict | None = None):
    """``torch.export`` of ``model`` on ``inputs`` and ``kwargs`` (caches off: Hugging Face models return them
    otherwise)."""
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    try:
        if cache:
            config.use_cache = False
        return torch.export.export(model, inputs, kwargs or None, strict=False)
    except Exception as e:
        raise ModelError(f"{fx_error}; torch.export cannot capture it either ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        if cache:
            config.use_cache = cache


def module_graph(model: nn.Module, inputs: tuple, fx_error: Exception, kwargs: dict | None = None) -> fx.Graph:
    """An fx graph of ``model`` at the level the handlers read: one ``call_module`` node per layer with a handler
    (its ATen operations folded, when they read one tensor and give one), ATen calls elsewhere, and every node's
    output shape in ``meta['tensor_meta']``."""
    ep = export(model, inputs, fx_error, kwargs)
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


def _tensors(args) -> list[fx.Node]:
    return [a for a in args if isinstance(a, fx.Node)]


def _union(b: Builder, lays) -> bool:
    """Merge the spaces of layouts with the same segments, position by position; False if they differ."""
    if any(lay is None for lay in lays) or not same_segments(lays):
        return False
    for segs in zip(*lays):
        for seg in segs[1:]:
            b.spaces.union(segs[0].space, seg.space)
    return True


def _refuse(b: Builder, n: fx.Node, why: str):
    for a in _tensors(n.args) + [x for a in n.args if isinstance(a, (list, tuple)) for x in _tensors(a)]:
        b.freeze(b.layout.get(a), why)
    return b.new_layout(n, why)


@register_handler(*MERGE_ATEN)
def _merge_broadcast(b: Builder, n: fx.Node, fn):
    """``a + b``, ``a * b``: the operands that span the output's channel axis are one group; an operand that is
    broadcast along it (size 1 there: rotary cos/sin, a norm's 1/rms, a mask) reads no channel."""
    out, args = b.shape(n), _tensors(n.args)
    axis = next((b.axis_of(a) + len(out) - len(b.shape(a)) for a in args if isinstance(b.layout.get(a), list)
                 and b.shape(a) is not None and b.axis_of(a) is not None
                 and b.shape(a)[b.axis_of(a)] == out[b.axis_of(a) + len(out) - len(b.shape(a))] > 1), None)
    if out is None or axis is None:
        return _refuse(b, n, f"{n.name}: operands with different channel layouts")
    spanning = []
    for a in args:
        s = b.shape(a)
        at = axis - (len(out) - len(s)) if s is not None else -1
        if s is not None and (at < 0 or s[at] == 1):
            continue                                        # broadcast along the channel axis
        if b.axis_of(a) != at:
            return _refuse(b, n, f"{n.name}: operands with different channel layouts")
        spanning.append(a)
    lays = [b.spaces.expand(b.layout.get(a)) if isinstance(b.layout.get(a), list) else None for a in spanning]
    if not _union(b, lays):
        return _refuse(b, n, f"{n.name}: operands with different channel layouts")
    b.axis[n] = axis
    return lays[0]


def _coarsen(b: Builder, lay, k: int):
    """``lay``'s one space, its channels taken k at a time (a head of k features): the space shrinks k-fold and
    its slots' factor grows k-fold. None if the space is already merged with others (its size is shared)."""
    sp = b.spaces
    lay = sp.expand(lay)
    if lay is None or len(lay) != 1 or lay[0].size % k:
        return None
    i = lay[0].space
    if sp.find(i) != i or any(sp.find(j) == i for j in range(len(sp.parent)) if j != i):
        return None
    sp.size[i] //= k
    sp.slots[i] = [Slot(s.module, s.dim, s.offset, s.factor * k) for s in sp.slots.get(i, [])]
    return [Segment(i, lay[0].size // k, lay[0].factor * k)]


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


@register_handler(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)
def _view(b: Builder, n: fx.Node, fn):
    """Reshapes of the channel axis that attention makes: [.., C] -> [.., heads, head_dim] (each head one
    channel of head_dim features), [.., heads, head_dim] -> [.., C] and [B, kv, rep, ..] -> [B, kv * rep, ..]
    (grouped-query attention's repeat: a channel of rep heads)."""
    x = n.args[0]
    s, out, axis, lay = b.shape(x), b.shape(n), b.axis_of(x), b.input_layout(n)
    if s is not None and s == out:
        return b.pass_through(n)
    if s is None or out is None or axis is None or lay is None:
        return b.unknown(n, f"operation view ({n.name})")
    c = s[axis]
    if axis == 1 and len(s) > 2 and len(out) == 2 and out[0] == s[0]:        # [N, C, H, W] -> [N, C*H*W]
        b.axis[n] = 1
        return flatten_layout(lay, s, out, b.freeze, n)
    if axis == len(s) - 1 and len(out) == len(s) + 1 and out[:axis] == s[:axis] and out[-2] * out[-1] == c:
        d = out[-1]                                           # split into heads
        if all(seg.factor % d == 0 for seg in lay):
            new = [Segment(seg.space, seg.size, seg.factor // d) for seg in lay]
        else:
            new = _coarsen(b, lay, d) if all(seg.factor == 1 for seg in lay) else None
            new = new and [Segment(seg.space, seg.size, 1) for seg in new]
        if new is not None:
            b.axis[n] = axis
            return new
    elif len(out) == len(s) - 1 and out[:axis] == s[:axis] and out[axis] == c * s[axis + 1] \
            and out[axis + 1:] == s[axis + 2:]:                # the channel axis merged with the next one
        b.axis[n] = axis
        return [Segment(seg.space, seg.size, seg.factor * s[axis + 1]) for seg in lay]
    return b.unknown(n, f"reshape {n.name} from {tuple(s)} to {tuple(out)} across the channel axis")


@register_handler(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
def _reduce(b: Builder, n: fx.Node, fn):
    """A reduction over other axes than the channel axis (global pooling) keeps the channels."""
    x = n.args[0]
    s, axis, lay = b.shape(x), b.axis_of(x), b.input_layout(n)
    dims = n.args[1] if len(n.args) > 1 else None
    if s is None or axis is None or lay is None or not dims:
        return b.unknown(n, f"operation {fn} ({n.name})")
    dims = {d % len(s) for d in dims}
    if axis in dims:
        return b.unknown(n, f"operation {fn} ({n.name}) over the channel axis")
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    b.axis[n] = axis if keepdim else axis - sum(d < axis for d in dims)
    return lay


@register_handler(aten.transpose.int, aten.unsqueeze.default, aten.expand.default, aten.slice.Tensor,
                  aten.select.int, aten.permute.default)
def _move(b: Builder, n: fx.Node, fn):
    """Operations that move the channel axis or work along another one."""
    x = n.args[0]
    s, out, axis, lay = b.shape(x), b.shape(n), b.axis_of(x), b.input_layout(n)
    if s is None or out is None or axis is None or lay is None:
        return b.unknown(n, f"operation {fn} ({n.name})")
    if fn == aten.transpose.int:
        d0, d1 = (d % len(s) for d in n.args[1:3])
        new = d1 if axis == d0 else d0 if axis == d1 else axis
    elif fn == aten.permute.default:
        new = [d % len(s) for d in n.args[1]].index(axis)
    elif fn == aten.unsqueeze.default:
        new = axis + (n.args[1] % len(out) <= axis)
    elif fn == aten.expand.default:
        new = axis + len(out) - len(s)
    else:
        dim = n.args[1] % len(s) if len(n.args) > 1 else 0
        if dim == axis:
            return b.unknown(n, f"operation {fn} ({n.name}) along the channel axis")
        new = axis - (fn == aten.select.int and dim < axis)
    if out[new] != s[axis]:
        return b.unknown(n, f"operation {fn} ({n.name}) changes the channel count")
    b.axis[n] = new
    return lay


@register_handler(aten.cat.default)
def _cat_aten(b: Builder, n: fx.Node, fn):
    """``cat`` on the channel axis concatenates layouts; on another axis (rotary embeddings' halves) the parts
    keep one layout."""
    tensors, dim = n.args[0], n.args[1] if len(n.args) > 1 else 0
    s, axis = b.shape(n), b.axis_of(tensors[0]) if tensors else None
    if s is not None and axis is not None and dim % len(s) != axis:
        lays = [b.spaces.expand(b.layout.get(a)) if isinstance(b.layout.get(a), list) else None for a in tensors]
        if {b.axis_of(a) for a in tensors} == {axis} and _union(b, lays):
            b.axis[n] = axis
            return lays[0]
        return _refuse(b, n, f"operation cat ({n.name}) of different channel layouts")
    lays = [b.spaces.expand(b.layout.get(a)) if isinstance(b.layout.get(a), list) else None for a in tensors]
    if axis is None or any(lay is None for lay in lays) or {b.axis_of(a) for a in tensors} != {axis}:
        return _refuse(b, n, f"operation cat ({n.name})")
    b.axis[n] = axis
    return [seg for lay in lays for seg in lay]


@register_handler(aten.scaled_dot_product_attention.default)
def _attention(b: Builder, n: fx.Node, fn):
    """``sdpa(q, k, v)`` on [B, heads, T, head_dim]: head i of q, k and v are one channel. With grouped-query
    attention (k and v repeated to channels of ``rep`` heads each, or ``enable_gqa=True`` with fewer k/v heads),
    q's heads are taken ``rep`` at a time: a key/value head and its query heads go together."""
    q, k, v = n.args[:3]
    why = f"attention {n.name}: heads of q, k and v do not line up"
    lays = [b.spaces.expand(b.layout.get(a)) if isinstance(b.layout.get(a), list) else None for a in (q, k, v)]
    if any(lay is None for lay in lays) or any(b.axis_of(a) != 1 for a in (q, k, v)):
        return _refuse(b, n, why)
    ql, kl, vl = lays
    gqa = n.kwargs.get("enable_gqa", False)
    heads = [sum(seg.size for seg in lay) for lay in lays]
    rep = heads[0] // heads[1] if gqa and heads[1] and heads[0] % heads[1] == 0 else kl[0].factor
    if rep > 1 and all(seg.factor == 1 for seg in ql):
        ql = _coarsen(b, ql, rep)
    if gqa and ql is not None:                  # k and v hold one row per head: line up by channel counts
        kl, vl = ([Segment(seg.space, seg.size, seg.factor * rep) for seg in lay] for lay in (kl, vl))
    if ql is None or not _union(b, [ql, kl, vl]):
        return _refuse(b, n, why)
    for a in n.args[3:]:
        if isinstance(a, fx.Node):
            b.freeze(b.layout.get(a), f"attention mask of {n.name}")
    b.axis[n] = 1
    return ql


# Modules whose fixed-size channel splits follow their layers after pruning (prune/hf.py re-derives the size).
RESIZED_SPLITS = {"transformers.models.gpt2.modeling_gpt2.GPT2Attention"}


def _split_owner(n: fx.Node) -> str | None:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][1] if stack else None


@register_handler(aten.split.Tensor, aten.split_with_sizes.default)
def _split_sizes(b: Builder, n: fx.Node, fn):
    """A split into parts of fixed sizes on the channel axis (GPT-2's ``c_attn(x).split(split_size)`` into
    q, k, v): each part its own channels, where the module that splits re-derives its sizes after pruning
    (``RESIZED_SPLITS``); frozen elsewhere. On another axis every part keeps the input's channels."""
    x = n.args[0]
    s, axis, lay = b.shape(x), b.axis_of(x), b.input_layout(n)
    dim = n.args[2] if len(n.args) > 2 else 0
    if s is None or axis is None or lay is None:
        return b.unknown(n, f"operation {fn} ({n.name})")
    sizes = list(n.args[1]) if fn == aten.split_with_sizes.default else \
        [n.args[1]] * (s[dim] // n.args[1]) + ([s[dim] % n.args[1]] if s[dim] % n.args[1] else [])
    b.axis[n] = axis
    if dim % len(s) != axis:
        return SplitParts([lay] * len(sizes))
    owner = _split_owner(n)
    cuts = [sum(sizes[:i]) for i in range(1, len(sizes))]
    refined = b.spaces.refine(lay, cuts) if owner in RESIZED_SPLITS else None
    if refined is None:
        return b.unknown(n, f"split ({n.name}) into parts of fixed sizes on the channel axis (the sizes are "
                            f"constants of {owner or 'forward'})")
    return SplitParts(group_segments(refined, sizes))
