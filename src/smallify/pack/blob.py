"""Tensors under ``SMALL_BYTES`` travel in one uint8 blob of the .smallify file (``container.py``): each
safetensors entry costs ~90 header bytes, a third of a small shared or pruned model's file."""
from __future__ import annotations

import math

import torch

from smallify.errors import ModelError

SMALL_BYTES = 512      # tensors below this size travel in one blob: a safetensors entry costs ~90 header bytes
BLOB = ":small"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                     torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                                     torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


def bundle_small(tensors: dict) -> dict:
    """Move the tensors under SMALL_BYTES into one uint8 tensor ``:small`` (in place); returns the table
    name -> [dtype, shape, byte offset] the manifest keeps. A model of a few hundred kilobytes that shares or
    prunes its weights is otherwise a third header."""
    keys = [k for k, t in tensors.items() if t.numel() * t.element_size() < SMALL_BYTES
            and str(t.dtype).removeprefix("torch.") in _DTYPES]
    if len(keys) < 2:
        return {}
    table, parts, offset = {}, [], 0
    for k in keys:
        t = tensors.pop(k).contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)
        table[k] = [str(t.dtype).removeprefix("torch."), list(t.shape), offset]
        parts.append(raw)
        offset += raw.numel()
    tensors[BLOB] = torch.cat(parts)
    return table


def unbundle_small(state: dict, table, path) -> None:
    """The inverse of ``bundle_small``, every entry checked (ModelError naming it)."""
    if not isinstance(table, dict):
        raise ModelError(f"{path}: the manifest's 'small' must map tensor names to [dtype, shape, offset]")
    blob = state.pop(BLOB, None)
    if blob is None or blob.dtype != torch.uint8 or blob.ndim != 1:
        raise ModelError(f"{path}: the manifest lists small tensors but the file has no uint8 {BLOB!r} tensor")
    for key, entry in table.items():
        ok = isinstance(entry, list) and len(entry) == 3 and entry[0] in _DTYPES and isinstance(entry[1], list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in entry[1]) \
            and isinstance(entry[2], int) and not isinstance(entry[2], bool) and entry[2] >= 0
        if not ok:
            raise ModelError(f"{path}: the small tensor {key!r} is recorded as {str(entry)[:80]}; accepted: "
                             "[dtype, shape, byte offset]")
        dtype, shape, offset = _DTYPES[entry[0]], entry[1], entry[2]
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if offset + nbytes > blob.numel():
            raise ModelError(f"{path}: the small tensor {key!r} ({nbytes} bytes at {offset}) runs past the "
                             f"{blob.numel()}-byte blob")
        state[key] = blob[offset:offset + nbytes].clone().view(dtype).reshape(shape)
