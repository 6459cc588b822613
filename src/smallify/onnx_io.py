"""Reading and writing ONNX files safely: clear errors on bad files, atomic writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from smallify.errors import ModelError, OutputError


def load(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    if path.suffix.lower() != ".onnx":
        raise ModelError(f"{path} is not an ONNX file (expected a .onnx file)")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path} is not a valid ONNX model ({first[:200]})") from None
    if not model.graph.node:
        raise ModelError(f"{path} holds an ONNX graph with no nodes")
    return model


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any long work, when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory; give a file name such as {path / 'model.int8.onnx'}")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {parent} is not writable")
    return path


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to a temporary file beside ``path`` and rename it: never a half-written file."""
    return write_atomic(path, lambda tmp: onnx.save(model, tmp))


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call ``write(temporary path)`` beside ``path``, then rename the result onto ``path``."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
