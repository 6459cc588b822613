"""The .smallify records of weight-shared layers (``smallify.cluster``): codebooks and entropy-coded indices.

Per k-means / binary / ternary / power-of-two layer the file holds its codebook (``<layer>.codebook``: float32
(R, k); INT8 values and one scale per codebook when clustered with ``snap='int8'``; or ``<layer>.scale`` and
``<layer>.levels`` for the structured codebooks) and ONE symbol stream ``<layer>.indices:coded``: each weight's
index, with the extra symbol k for a pruned (exactly zero) weight, so that the mask costs what its entropy costs.
The stream is coded by ``pack/entropy.py`` (bit-packed, Huffman or zstd: whichever is smallest). Hashed layers
(``HashShare``) hold their buckets only: the hashes are rebuilt from the seed in the manifest.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from smallify.errors import ConfigError, ModelError


def shared_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from smallify.cluster.modules import SharedTwin

    return [(n, m) for n, m in model.named_modules() if isinstance(m, SharedTwin)]


def save_records(model: nn.Module, tensors: dict) -> dict:
    """Replace each shared layer's indices / mask / float codebook in ``tensors`` by its coded records; returns
    the manifest's ``shared`` section (layer -> record)."""
    from smallify.pack.entropy import FAST_METHODS, encode

    records = {}
    for name, m in shared_layers(model):
        symbols, alphabet = symbol_stream(m)
        masked = m.mask is not None
        method, payload = encode(symbols, alphabet, FAST_METHODS)   # zstd of one byte per symbol never won
        tensors.pop(f"{name}.indices", None)
        tensors.pop(f"{name}.mask", None)
        tensors[f"{name}.indices:coded"] = torch.from_numpy(np.array(payload, dtype=np.uint8))
        record = {"share": dict(m.share), "type": type(m).float_type.__name__, "shape": list(m.weight_shape),
                  "masked": masked, "coder": method, "alphabet": alphabet, "count": int(symbols.size)}
        grid = int8_grid(m)
        if grid is not None:
            q = grid[0]         # its scale is the layer's codebook_scale buffer, stored as it is
            tensors.pop(f"{name}.codebook")
            tensors[f"{name}.codebook:int8"] = q
            record["codebook"] = "int8"
        records[name] = record
    return records


def symbol_stream(m: nn.Module) -> tuple[np.ndarray, int]:
    """(one symbol per weight: its index, or k for a pruned zero; the alphabet k or k + 1) of a shared layer."""
    k = int(m.codebook_values().shape[1])
    idx = m.indices.reshape(-1).to(torch.int64)
    if m.mask is not None:
        idx = torch.where(m.mask.reshape(-1), idx, torch.full_like(idx, k))
    alphabet = k + 1 if m.mask is not None else k
    return idx.numpy().astype(np.uint8 if alphabet <= 256 else np.uint16), alphabet


def int8_grid(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codebook (R, k), scale (R, 1)) when the layer's k-means codebook lies exactly on an INT8 grid of
    one scale per codebook (``snap='int8'``); None otherwise."""
    scale = getattr(m, "codebook_scale", None)
    if "codebook" not in m._parameters or scale is None:
        return None
    c = m.codebook.detach()
    q = torch.round(c / scale)
    if not torch.equal(q * scale, c) or bool((q.abs() > 127).any()):
        return None
    return q.to(torch.int8), scale.float()


def rebuild(model: nn.Module, records: dict, path) -> nn.Module:
    """The shared structure of the manifest's records on ``model`` (BatchNorms folded first, as ``cluster``
    did), with placeholder values that the file's tensors then fill."""
    from smallify.cluster.modules import TWINS, lookup, rows_shape
    from smallify.quant.modules import replace_module
    from smallify.quant.weight_only import fold_batchnorm

    if not isinstance(records, dict):
        raise ModelError(f"{path}: the manifest's 'shared' must map layer names to records")
    for name, rec in records.items():
        check_record(name, rec, path)
    model = fold_batchnorm(model)
    modules = dict(model.named_modules())
    for name, rec in records.items():
        m = modules.get(name)
        if m is None:
            raise ModelError(f"{path}: the file holds shared layer {name!r}, which the model lacks; build the "
                             "architecture the file was saved from")
        twin = lookup(m, TWINS, type(None))
        if twin is None or type(m).__name__ != rec["type"] and twin.float_type.__name__ != rec["type"]:
            raise ModelError(f"{path}: shared layer {name!r} is a {rec['type']} in the file and a "
                             f"{type(m).__name__} in the model")
        shape = tuple(rec["shape"])
        if tuple(m.weight.shape) != shape:
            raise ModelError(f"{path}: shared layer {name!r} has shape {list(shape)} in the file and "
                             f"{list(m.weight.shape)} in the model")
        share = rec["share"]
        try:
            r, _ = rows_shape(shape, share["scope"], share.get("group_size"))
        except ConfigError as e:
            raise ModelError(f"{path}: shared layer {name!r}: {e}") from None
        k = share["k"]
        idx = torch.zeros(shape, dtype=torch.uint8)
        mask = torch.ones(shape, dtype=torch.bool) if rec["masked"] else None
        if share["kind"] == "kmeans":
            new = twin.build(m, share, idx, codebook=torch.zeros(r, k), mask=mask)
        else:
            new = twin.build(m, share, idx, scale=torch.zeros(r, 1), levels=torch.zeros(k), mask=mask)
        if share.get("snap") == "int8":       # the INT8 grid kept (the codebook may have left it in fine-tuning)
            new.register_buffer("codebook_scale", torch.ones(r, 1))
        replace_module(model, name, new)
    return model


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_record(name: str, rec, path) -> None:
    """ModelError naming the layer when a manifest record's fields have the wrong types or values."""
    def bad(what: str):
        raise ModelError(f"{path}: the record of shared layer {name!r} has {what}")

    if not isinstance(rec, dict) or not isinstance(rec.get("share"), dict):
        bad("no 'share' object")
    share = rec["share"]
    if share.get("scope") not in ("layer", "channel", "group"):
        bad(f"scope={share.get('scope')!r}; accepted: 'layer', 'channel', 'group'")
    if share.get("group_size") is not None and not (_is_int(share["group_size"]) and share["group_size"] >= 1):
        bad(f"group_size={share.get('group_size')!r}; accepted: a positive integer or null")
    if not (_is_int(share.get("k")) and 2 <= share["k"] <= 256):
        bad(f"k={share.get('k')!r}; accepted: an integer 2..256")
    for key in ("count", "alphabet"):
        if not (_is_int(rec.get(key)) and rec[key] >= 0):
            bad(f"{key}={rec.get(key)!r}; accepted: a non-negative integer")
    if not isinstance(rec.get("masked"), bool) or not isinstance(rec.get("coder"), str) \
            or not isinstance(rec.get("type"), str) or not isinstance(rec.get("shape"), list) \
            or not all(_is_int(d) and d > 0 for d in rec["shape"]) or not rec["shape"]:
        bad("a missing or mistyped field among masked, coder, type, shape")


def decode_records(state: dict, records: dict, path) -> None:
    """Put each shared layer's indices, mask and float codebook back into ``state`` (checked against the
    manifest: ModelError naming the layer when the codebook and the indices disagree)."""
    from smallify.pack.entropy import decode

    for name, rec in records.items():
        key = f"{name}.indices:coded"
        if key not in state:
            raise ModelError(f"{path}: the manifest needs tensor {key!r}, which the file does not hold")
        shape, k = rec["shape"], rec["share"]["k"]
        count, alphabet = math.prod(shape), rec["alphabet"]
        if rec["count"] != count or alphabet != k + (1 if rec["masked"] else 0):
            raise ModelError(f"{path}: the index stream of layer {name!r} declares {rec['count']} symbols of "
                             f"alphabet {alphabet}; its shape {shape} and {k} shared values need {count} of "
                             f"alphabet {k + (1 if rec['masked'] else 0)}")
        payload = state.pop(key)
        if payload.dtype != torch.uint8 or payload.ndim != 1:
            raise ModelError(f"{path}: the index stream of layer {name!r} is {payload.dtype} {list(payload.shape)}; "
                             "a coded stream is a 1-D uint8 tensor")
        try:
            symbols = torch.from_numpy(decode(rec["coder"], payload.numpy(), count, alphabet).astype(np.int64))
        except ModelError as e:
            raise ModelError(f"{path}: the index stream of layer {name!r} does not decode: {e}") from None
        if bool((symbols >= alphabet).any()):
            raise ModelError(f"{path}: the index stream of layer {name!r} holds indices >= {alphabet}: its codebook "
                             "and indices disagree")
        if rec["masked"]:
            mask = symbols != k
            state[f"{name}.mask"] = mask.reshape(shape)
            symbols = torch.where(mask, symbols, torch.zeros_like(symbols))
        state[f"{name}.indices"] = symbols.to(torch.uint8).reshape(shape)
        if rec.get("codebook") == "int8":
            q, scale = state.pop(f"{name}.codebook:int8", None), state.get(f"{name}.codebook_scale")
            if q is None or scale is None or q.dtype != torch.int8 or q.ndim != 2 or q.shape[1] != k \
                    or tuple(scale.shape) != (q.shape[0], 1) or not bool(torch.isfinite(scale).all()):
                raise ModelError(f"{path}: the INT8 codebook of layer {name!r} is missing or does not fit "
                                 f"{k} values per codebook with one scale each")
            state[f"{name}.codebook"] = q.float() * scale
