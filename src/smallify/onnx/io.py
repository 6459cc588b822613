"""Reading and writing ONNX files: clear errors on bad files, atomic writes, and models over 1 GB through
files with external data (one protobuf cannot exceed 2 GB)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from smallify.errors import ModelError, first_line
from smallify.files import check_writable, write_atomic  # noqa: F401 - onnx_io.check_writable for callers


def load(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    if path.suffix.lower() != ".onnx":
        raise ModelError(f"{path} is not an ONNX file (expected a .onnx file)")
    try:
        onnx.checker.check_model(str(path))      # by path: models over 2 GB (external data) check too
        model = onnx.load(str(path))
    except Exception as e:
        first = first_line(e)
        raise ModelError(f"{path} is not a valid ONNX model ({first[:200]})") from None
    if not model.graph.node:
        raise ModelError(f"{path} holds an ONNX graph with no nodes")
    newest = onnx.defs.onnx_opset_version()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > newest:
        raise ModelError(f"{path} uses ONNX opset {opset}; this installation reads opsets up to {newest}: "
                         f"export the model at opset {newest} or lower")
    return model


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to a temporary file beside ``path`` and rename it: never a half-written file."""
    return write_atomic(path, lambda tmp: onnx.save(model, tmp))


LARGE_MODEL_BYTES = 1 << 30   # above this, models travel through files with external data (protobuf's 2 GB cap)


def save_onnx(model: onnx.ModelProto, path) -> None:
    """Write ``model`` atomically; a model over 1 GB keeps its weights in an external-data file beside it
    (``<name>.data``), since one protobuf cannot exceed 2 GB. Both files are written in a temporary folder
    beside ``path`` and renamed into place (the data file first), so a re-run replaces, never appends."""
    if model.ByteSize() <= LARGE_MODEL_BYTES:
        save(model, path)
        return
    import shutil

    path = check_writable(path)
    name = path.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path.parent))
    try:
        onnx.save(copy_model(model), str(tmp / name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=name + ".data")
        os.replace(tmp / (name + ".data"), path.parent / (name + ".data"))
        os.replace(tmp / name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_model(model: onnx.ModelProto) -> None:
    """onnx's checker, through a file with external data for a model over ``LARGE_MODEL_BYTES``."""
    if model.ByteSize() <= LARGE_MODEL_BYTES:
        onnx.checker.check_model(model)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check.onnx")
        onnx.save(copy_model(model), path, save_as_external_data=True, location="check.onnx.data")
        onnx.checker.check_model(path)


def ort_session(model: onnx.ModelProto, so):
    """An ONNX Runtime CPU session of ``model`` (from memory, or through a file with external data for a model
    over ``LARGE_MODEL_BYTES``: one protobuf cannot exceed 2 GB)."""
    import onnxruntime as ort

    if model.ByteSize() <= LARGE_MODEL_BYTES:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(copy_model(model), path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
