"""Calibration and evaluation data adapters, and the forward-hook adapter PyTorch-side passes share.

Accepted forms of ``data`` (for a model with inputs ``names``):
  * a tensor or array: the batch axis first, one model input;
  * an iterable (list, generator, DataLoader) of batches, each a tensor/array, a tuple/list whose first
    ``len(names)`` items are the inputs (trailing items such as labels are ignored), or a dict keyed by
    input name;
  * a dict ``{input name: array}`` of whole data sets (as read from a .npz file), cut into batches.
"""
from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
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
    if isinstance(data, (str, os.PathLike)):
        data = load_npz(data, limit)            # a .npz path: read lazily, at most ``limit`` samples
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if len(names) != 1:
            raise DataError(f"the model has {len(names)} inputs {names}; give a dict keyed by input name")
        source: Iterable = _split({names[0]: data}, batch_size)
    elif isinstance(data, Mapping) and data and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in data.values()):
        if len(data) == 1 and len(names) == 1:      # a single array may use any key (as in a .npz)
            data = {names[0]: next(iter(data.values()))}
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



# Adapters for PyTorch-side passes (pruning's statistics, branch ranking, least-squares refits): batches as the
# user gives them, cut to a sample budget, and forward hooks on named layers.

def inputs_and_labels(batch) -> tuple[object, object]:
    """``(inputs, labels)`` of one batch: a tuple/list gives its first two items (labels None if it holds
    one), anything else is the inputs alone."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def first_batches(data, limit: int = 512) -> list:
    """The first batches of ``data`` that hold at least ``limit`` samples (all of them if fewer), as given:
    ``data`` is a ``TrainData`` (its first epoch's order), a tensor (cut into batches of 64) or an iterable of
    batches; None gives no batch."""
    from smallify.train import TrainData

    if data is None:
        return []
    if isinstance(data, TrainData):
        data = data.epoch(0)
    elif isinstance(data, torch.Tensor):
        data = [data[i:i + 64] for i in range(0, len(data), 64)]
    out, seen = [], 0
    for b in data:
        out.append(b)
        inputs = inputs_and_labels(b)[0]
        seen += len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) and inputs else len(inputs)
        if seen >= limit:
            break
    return out


def run_hooked(model: torch.nn.Module, batches, hooks: dict, modules: dict) -> None:
    """Run the inputs of ``batches`` through ``model`` (no grad; a dict of inputs is passed as keywords: a
    tokenizer's output) with forward hooks attached (layer name ->
    ``hook(module, args, output)``; ``modules``: name -> module), then remove them."""
    handles = [modules[n].register_forward_hook(fn) for n, fn in hooks.items()]
    try:
        with torch.no_grad():
            for b in batches:
                inputs = inputs_and_labels(b)[0]
                model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    finally:
        for h in handles:
            h.remove()

MAX_NPZ_BYTES = 2 << 30    # what load_npz reads into memory at most (pass max_samples to read less)
_CHUNK = 1 << 22           # bytes decompressed per read: memory stays bounded whatever the file declares


def npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The shape and dtype of every array in a calibration .npz, from the headers only (nothing is read)."""
    with _open_npz(Path(path)) as (zf, members):
        return {key: _header(zf, info, Path(path))[:2] for key, info in members.items()}


def load_npz(path: str | os.PathLike, max_samples: int | None = None,
             max_bytes: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
    """Read a calibration .npz (one array per model input, samples on the first axis), without pickles.

    The arrays are streamed from the archive: only the first ``max_samples`` samples of each are
    decompressed (the rest of the file is never read), and at most ``max_bytes`` are held in memory, so a
    header that declares a huge shape or a deflate stream that expands to gigabytes is refused or cut,
    never loaded whole. Every header is checked against the archive's own sizes before anything is read.
    """
    path = Path(path)
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples={max_samples!r} must be >= 1 or None")
    arrays, total = {}, 0
    with _open_npz(path) as (zf, members):
        plans = {}
        for key, info in members.items():
            shape, dtype, fortran, offset = _header(zf, info, path)
            rows = shape[0] if max_samples is None else min(shape[0], max_samples)
            row_bytes = dtype.itemsize * math.prod(shape[1:])
            need = dtype.itemsize * math.prod(shape) if fortran else rows * row_bytes
            total += need
            if total > max_bytes:
                raise DataError(f"calibration array {key!r} in {path} has shape {shape} ({_gib(need)}); smallify "
                                f"reads at most {_gib(max_bytes)} of calibration data: pass --max-samples N "
                                "(max_samples=N) to read the first N samples")
            plans[key] = (info, shape, dtype, fortran, offset, rows, need)
        for key, (info, shape, dtype, fortran, offset, rows, need) in plans.items():
            raw = _read_member(zf, info, offset, need, key, path)
            if fortran:
                a = raw.view(dtype).reshape(shape[::-1]).T[:rows]
            else:
                a = raw.view(dtype).reshape((rows,) + shape[1:])
            arrays[key] = np.ascontiguousarray(a, dtype=dtype.newbyteorder("="))
    return arrays


# What zipfile and numpy's header parser raise on damaged archives (found by fuzzing, benchmarks/fuzz_loaders.py).
_ZIP_FAULTS = (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, NotImplementedError, RuntimeError,
               struct.error, KeyError, IndexError, OverflowError)


class _open_npz:
    """``with _open_npz(path) as (zipfile, {array name: ZipInfo})``: every archive fault becomes a DataError."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        path = self.path
        if not path.exists():
            raise DataError(f"calibration file {path} does not exist")
        if not path.is_file():
            raise DataError(f"calibration path {path} is not a file; give a .npz file")
        try:
            self.zf = zipfile.ZipFile(path)
        except _ZIP_FAULTS as e:
            raise DataError(f"{path} is not a readable .npz file ({_why(e)}); write it with numpy.savez") from None
        members = {}
        for info in self.zf.infolist():
            if info.filename.endswith("/"):          # a folder entry (ZipInfo.is_dir fails on an empty name)
                continue
            if not info.filename.endswith(".npy"):
                self.zf.close()
                raise DataError(f"{path} holds {info.filename!r}, which is not a .npy array; a calibration .npz "
                                "holds only arrays (numpy.savez)")
            members[info.filename[:-4]] = info
        if not members:
            self.zf.close()
            raise DataError(f"calibration file {path} holds no arrays")
        return self.zf, members

    def __exit__(self, *exc):
        self.zf.close()
        return False


_ACCEPTED = "accepted: float, integer or bool arrays (numpy.savez of plain arrays)"


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path):
    """(shape, dtype, fortran order, data offset) of one member, checked against the archive's sizes."""
    key = info.filename[:-4]
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version} is not supported (1.0, 2.0)")
            offset = f.tell()
    except Exception as e:   # numpy parses the header with tokenize + ast: TokenError, RecursionError, ... (fuzzing)
        raise DataError(f"calibration array {key!r} in {path} has no readable .npy header ({_why(e)}); write it "
                        "again with numpy.savez (plain float, integer or bool arrays)") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf" or dtype.itemsize == 0:
        raise DataError(f"calibration array {key!r} in {path} has dtype {dtype}; {_ACCEPTED}")
    shape = tuple(int(d) for d in shape)
    if not shape or shape[0] == 0:
        raise DataError(f"calibration array {key!r} in {path} is empty (shape {shape}); "
                        "the first axis must count the samples")
    if any(d <= 0 for d in shape):
        raise DataError(f"calibration array {key!r} in {path} has shape {shape}; every axis must hold values")
    declared = dtype.itemsize * math.prod(shape)
    if info.file_size - offset != declared:
        raise DataError(f"calibration array {key!r} in {path}: its header declares shape {shape} {dtype} "
                        f"({declared} bytes) but the archive holds {max(info.file_size - offset, 0)} bytes for it; "
                        "the file is truncated or corrupt: write it again with numpy.savez")
    return shape, dtype, fortran, offset


def _read_member(zf, info, offset: int, need: int, key: str, path: Path) -> np.ndarray:
    """The ``need`` bytes after the header of one member, decompressed in bounded chunks."""
    out = np.empty(need, np.uint8)
    done = 0
    try:
        with zf.open(info) as f:
            f.read(offset)
            while done < need:
                chunk = f.read(min(_CHUNK, need - done))
                if not chunk:
                    break
                out[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                done += len(chunk)
    except _ZIP_FAULTS as e:
        raise DataError(f"calibration array {key!r} in {path} cannot be read ({_why(e)}); "
                        "the file is corrupt: write it again with numpy.savez") from None
    if done < need:
        raise DataError(f"calibration array {key!r} in {path} ends after {done} of {need} bytes; "
                        "the file is truncated: write it again with numpy.savez")
    return out


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
