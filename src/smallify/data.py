"""Calibration and evaluation data adapters.

Accepted forms of ``data`` (for a model with inputs ``names``):
  * a tensor or array: the batch axis first, one model input;
  * an iterable (list, generator, DataLoader) of batches, each a tensor/array, a tuple/list whose first
    ``len(names)`` items are the inputs (trailing items such as labels are ignored), or a dict keyed by
    input name;
  * a dict ``{input name: array}`` of whole data sets (as read from a .npz file), cut into batches.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from smallify.errors import DataError


def _as_tensor(x, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise DataError(f"{where}: expected a tensor or numpy array, got {type(x).__name__}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise DataError(f"{where}: calibration data holds NaN or Inf")
    return t


def _split(arrays: Mapping[str, object], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    tensors = {k: _as_tensor(v, f"input {k!r}") for k, v in arrays.items()}
    n = {t.shape[0] if t.ndim else 0 for t in tensors.values()}
    if len(n) != 1:
        raise DataError(f"inputs disagree on the number of samples (first axis): "
                        f"{ {k: tuple(t.shape) for k, t in tensors.items()} }")
    total = n.pop()
    for i in range(0, total, batch_size):
        yield {k: t[i:i + batch_size] for k, t in tensors.items()}


def batches(data, names: list[str], batch_size: int = 32, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yield dicts ``{input name: tensor}``, checking every batch; raise DataError if ``data`` is empty.

    ``limit`` stops after that many samples (counted on the first axis). Shapes must agree across batches
    except on the first (batch) axis.
    """
    if data is None:
        raise DataError("no calibration data given; pass an iterable of batches, a tensor or a dict of arrays")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if len(names) != 1:
            raise DataError(f"the model has {len(names)} inputs {names}; give a dict keyed by input name")
        source: Iterable = _split({names[0]: data}, batch_size)
    elif isinstance(data, Mapping) and data and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in data.values()):
        source = _split(data, batch_size)
    elif isinstance(data, Iterable):
        source = data
    else:
        raise DataError(f"calibration data of type {type(data).__name__} is not supported; "
                        "accepted: tensor, numpy array, iterable of batches, dict of arrays")
    seen, shapes = 0, None
    for i, batch in enumerate(source):
        b = _normalize(batch, names, i)
        sig = {k: tuple(v.shape[1:]) for k, v in b.items()}
        if shapes is None:
            shapes = sig
        elif sig != shapes:
            raise DataError(f"calibration batch {i} has shapes {sig} (without the batch axis); "
                            f"earlier batches had {shapes}")
        yield b
        seen += next(iter(b.values())).shape[0] if b else 0
        if limit is not None and seen >= limit:
            break
    if shapes is None:
        raise DataError("calibration data is empty: it yielded no batch")


def _normalize(batch, names: list[str], i: int) -> dict[str, torch.Tensor]:
    where = f"calibration batch {i}"
    if isinstance(batch, Mapping):
        missing = [n for n in names if n not in batch]
        if missing:
            raise DataError(f"{where}: missing input(s) {missing}; keys given: {sorted(batch)}; expected: {names}")
        return {n: _as_tensor(batch[n], f"{where}, input {n!r}") for n in names}
    if isinstance(batch, (tuple, list)):
        if len(batch) < len(names):
            raise DataError(f"{where}: {len(batch)} item(s) but the model has {len(names)} input(s) {names}")
        return {n: _as_tensor(x, f"{where}, input {n!r}") for n, x in zip(names, batch)}
    if len(names) != 1:
        raise DataError(f"{where}: a single tensor given but the model has {len(names)} inputs {names}")
    return {names[0]: _as_tensor(batch, where)}


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a calibration .npz (one array per model input, samples on the first axis), without pickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a readable .npz file of plain arrays ({e})") from None
    if not arrays:
        raise DataError(f"calibration file {path} holds no arrays")
    for k, a in arrays.items():
        if a.ndim == 0 or a.shape[0] == 0:
            raise DataError(f"calibration array {k!r} in {path} is empty (shape {a.shape}); "
                            "the first axis must count the samples")
    return arrays
