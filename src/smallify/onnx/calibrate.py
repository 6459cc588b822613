"""Calibration on ONNX models: match the data to the model's inputs, run ONNX Runtime batch by batch (a fixed
batch dimension is respected) and feed each observed tensor to its observer."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from smallify import data as data_mod
from smallify.errors import DataError, first_line
from smallify.onnx.graph import input_names
from smallify.onnx.io import ort_session
from smallify.progress import track
from smallify.quant import observers
from smallify.quant.config import Int8Static


def check_calibration_inputs(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Match a .npz's arrays to the model's inputs by name (a single array may have any key) and shape."""
    names = input_names(model)
    if len(arrays) == 1 and len(names) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing or extra:
        raise DataError(f"calibration arrays {sorted(arrays)} do not match the model inputs {names}"
                        + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    by_name = {i.name: i for i in model.graph.input}
    for name in names:
        dims = by_name[name].type.tensor_type.shape.dim
        want = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        got = arrays[name].shape
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want[1:], got[1:])):
            shown = ["N" if w is None else w for w in want]
            raise DataError(f"calibration array {name!r} has shape {tuple(got)}; the model input expects "
                            f"{tuple(shown)} (first axis = samples)")
        elem = by_name[name].type.tensor_type.elem_type
        if elem == TensorProto.FLOAT:
            if not np.issubdtype(arrays[name].dtype, np.floating):
                raise DataError(f"calibration array {name!r} has dtype {arrays[name].dtype}; the model input is float32")
            arrays[name] = arrays[name].astype(np.float32, copy=False)
            if not np.isfinite(arrays[name]).all():
                raise DataError(f"calibration array {name!r} holds NaN or Inf")
    return arrays


def calibration_batch_size(model: onnx.ModelProto) -> int:
    first = model.graph.input[0].type.tensor_type.shape.dim
    return first[0].dim_value if first and first[0].HasField("dim_value") else 32


def calibrate(model: onnx.ModelProto, tensors: list[str], data, config: Int8Static, progress: bool = True,
              make_observer=None, what: str = "calibrating") -> tuple[dict, int]:
    """Run ONNX Runtime on ``data`` and observe every tensor in ``tensors``; returns observers and sample count.
    ``make_observer(tensor)`` overrides the config's activation observer."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort_session(probe, so)
    fmt = config.activation_format
    make_observer = make_observer or (lambda t: observers.make_observer(config.calibration, config.percentile, t, fmt))
    obs = {t: make_observer(t) for t in tensors}
    names, samples = input_names(model), 0
    dtypes = {i.name: i.type for i in session.get_inputs()}
    for batch in track(data_mod.batches(data, names, calibration_batch_size(model), config.max_calibration_samples),
                       what, progress):
        feed = {k: v.numpy().astype(np.float32) if "float" in dtypes[k] else v.numpy() for k, v in batch.items()}
        try:
            outs = session.run(tensors, feed)
        except Exception as e:
            raise DataError(f"ONNX Runtime rejected the calibration batch: {first_line(e, 300)}") from None
        for t, value in zip(tensors, outs):
            obs[t].observe(torch.from_numpy(np.asarray(value, dtype=np.float32)))
        samples += next(iter(batch.values())).shape[0]
    return obs, samples
