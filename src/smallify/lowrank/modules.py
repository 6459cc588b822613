"""The decomposed layer: plain smaller layers in a row (``Decomposed``, an ``nn.Sequential``), so that every
runtime, exporter, quantizer and pruner sees ordinary Linear / Conv2d layers. ``parts_spec`` describes one as
plain data for the container's manifest, ``from_spec`` builds it back (zeros; the file fills the weights)."""
from __future__ import annotations

import torch
from torch import nn

from smallify.errors import ModelError
from smallify.lowrank.factor import Factors


class Decomposed(nn.Sequential):
    """A layer written as smaller layers: ``method`` ('svd', 'spatial', 'tucker', 'separable'), ``ranks``."""

    def __init__(self, method: str, ranks: tuple[int, ...], *parts: nn.Module):
        super().__init__(*parts)
        self.method, self.ranks = method, tuple(ranks)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, ranks={self.ranks}"


def _conv(cin, cout, kernel, stride=1, padding=0, dilation=1, groups=1, bias=False, device=None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=bias, device=device)


def empty_parts(layer: nn.Module, method: str, ranks: tuple[int, ...], device="meta") -> list[nn.Module]:
    """The plain layers that ``method`` at ``ranks`` writes ``layer`` (nn.Linear or nn.Conv2d) as, without
    weights (``device='meta'``: for costing candidates): stride, padding and dilation are split between the
    parts so that they compute the composite weight exactly as ``layer`` computes its own; the bias goes on the
    last part."""
    has_bias = layer.bias is not None
    kw_ = {"device": device}
    if isinstance(layer, nn.Linear):
        r = ranks[0]
        return [nn.Linear(layer.in_features, r, bias=False, **kw_), nn.Linear(r, layer.out_features, bias=has_bias, **kw_)]
    C, O = layer.in_channels, layer.out_channels
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    pad = layer.padding
    if isinstance(pad, str):
        raise ModelError(f"padding={pad!r} is not decomposed; accepted: numeric padding")
    ph, pw = pad
    if method == "svd":
        r = ranks[0]
        return [_conv(C, r, 1, layer.stride, pad, **kw_), _conv(r, O, 1, bias=has_bias, **kw_)]
    if method == "spatial":
        r = ranks[0]
        return [_conv(C, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), **kw_),
                _conv(r, O, (1, kw), (1, sw), (0, pw), (1, dw), bias=has_bias, **kw_)]
    if method == "tucker":
        r_out, r_in = ranks
        return [_conv(C, r_in, 1, **kw_), _conv(r_in, r_out, (kh, kw), layer.stride, pad, layer.dilation, **kw_),
                _conv(r_out, O, 1, bias=has_bias, **kw_)]
    if method == "separable":
        m = ranks[0]
        return [_conv(C, C * m, (kh, kw), layer.stride, pad, layer.dilation, groups=C, **kw_),
                _conv(C * m, O, 1, bias=has_bias, **kw_)]
    raise ModelError(f"unknown decomposition method {method!r}")


def build(layer: nn.Module, f: Factors) -> Decomposed:
    """The Decomposed twin of ``layer`` (nn.Linear or nn.Conv2d) holding the weights of ``f``."""
    parts = empty_parts(layer, f.method, f.ranks, device=layer.weight.device)
    dtype = layer.weight.dtype
    with torch.no_grad():
        for p, t in zip(parts, f.weights):
            p.to(dtype)
            p.weight.copy_(t.reshape(p.weight.shape).to(dtype))
        if layer.bias is not None:
            parts[-1].bias.copy_(layer.bias.detach())
    return Decomposed(f.method, f.ranks, *parts).to(dtype).train(layer.training)


def parts_spec(d: Decomposed) -> dict:
    """Plain data that ``from_spec`` turns back into an empty ``d``."""
    parts = []
    for p in d:
        if isinstance(p, nn.Linear):
            parts.append({"type": "linear", "in": p.in_features, "out": p.out_features, "bias": p.bias is not None})
        else:
            parts.append({"type": "conv2d", "in": p.in_channels, "out": p.out_channels,
                          "kernel": list(p.kernel_size), "stride": list(p.stride), "padding": list(p.padding),
                          "dilation": list(p.dilation), "groups": p.groups, "bias": p.bias is not None})
    return {"method": d.method, "ranks": list(d.ranks), "parts": parts}


def _ints(value, n: int | None, where: str) -> list[int]:
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if not ok or (n is not None and len(value) != n):
        raise ModelError(f"{where} is {str(value)[:60]!r}; accepted: a list of {n or 'some'} non-negative integers")
    return value


def from_spec(spec, where: str) -> Decomposed:
    """An empty Decomposed from a manifest entry, every field checked (ModelError naming ``where``)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("parts"), list) or not spec["parts"] \
            or not isinstance(spec.get("method"), str):
        raise ModelError(f"{where}: accepted: {{'method': str, 'ranks': [int], 'parts': [...]}}")
    parts = []
    for i, p in enumerate(spec["parts"]):
        at = f"{where} part {i}"
        if not isinstance(p, dict) or p.get("type") not in ("linear", "conv2d"):
            raise ModelError(f"{at}: type must be 'linear' or 'conv2d'")
        cin, cout = _ints([p.get("in"), p.get("out")], 2, f"{at} in/out")
        if min(cin, cout) < 1 or not isinstance(p.get("bias"), bool):
            raise ModelError(f"{at}: in/out must be >= 1 and bias true or false")
        if p["type"] == "linear":
            parts.append(nn.Linear(cin, cout, bias=p["bias"]))
            continue
        kernel, stride = _ints(p.get("kernel"), 2, f"{at} kernel"), _ints(p.get("stride"), 2, f"{at} stride")
        padding, dilation = _ints(p.get("padding"), 2, f"{at} padding"), _ints(p.get("dilation"), 2, f"{at} dilation")
        groups = _ints([p.get("groups")], 1, f"{at} groups")[0]
        if min(kernel + stride + dilation + [groups]) < 1 or cin % groups or cout % groups:
            raise ModelError(f"{at}: kernel, stride, dilation and groups must be >= 1, groups dividing in and out")
        parts.append(nn.Conv2d(cin, cout, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), groups,
                               bias=p["bias"]))
    ranks = _ints(spec.get("ranks"), None, f"{where} ranks")
    return Decomposed(spec["method"], tuple(ranks), *parts)


def decomposed_layers(model: nn.Module) -> dict[str, dict]:
    """name -> parts_spec of every Decomposed layer in ``model`` (what the container's manifest records), and
    of those a verb's re-tracing turned into plain containers (``carry_structure``)."""
    out = dict(getattr(model, "smallify_decomposed", None) or {})
    out.update({n: parts_spec(m) for n, m in model.named_modules() if isinstance(m, Decomposed)})
    return out


def carry_structure(source: nn.Module, result: nn.Module) -> nn.Module:
    """Keep on ``result`` (a verb's output, e.g. a torch.fx GraphModule from quantization, whose re-traced
    containers are plain modules) the structure records of ``source`` that ``save`` writes: the decomposed
    layers and the residual branches pruning removed."""
    from smallify.prune.branches import removed_branches

    decomposed = decomposed_layers(source)
    if decomposed and isinstance(result, nn.Module):
        result.smallify_decomposed = decomposed
    branches = removed_branches(source)
    meta = getattr(result, "meta", None)
    if branches and isinstance(meta, dict) and not meta.get("smallify_removed_branches"):
        meta["smallify_removed_branches"] = branches
    return result


def rebuild(model: nn.Module, specs, path) -> nn.Module:
    """Put an empty Decomposed at every layer the manifest lists (``load``; the weights come after), on the
    model with its BatchNorms folded, as ``decompose`` made it."""
    from smallify.quant.modules import replace_module
    from smallify.quant.weight_only import fold_batchnorm

    model = fold_batchnorm(model)
    if not isinstance(specs, dict):
        raise ModelError(f"{path}: the manifest's 'decomposed' must map layer names to their parts")
    names = dict(model.named_modules())
    for name, spec in specs.items():
        if name not in names:
            raise ModelError(f"{path}: the manifest decomposes layer {name!r}, which the model lacks; build the "
                             "architecture the file was saved from")
        replace_module(model, name, from_spec(spec, f"{path}: decomposed layer {name!r}"))
    return model
