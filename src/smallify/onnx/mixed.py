"""Mixed precision for ONNX models: the search of ``smallify/quant/mixed.py`` judged by running candidate
files (the user's ``eval_fn(path)``, or output SQNR against the float model on the calibration data)."""
from __future__ import annotations

import math
import os

from smallify.quant.mixed import MixedPrecision, search


def sqnr_metric(float_path: str, model, data, limit: int = 64):
    """Without eval_fn: output SQNR (dB) of an ONNX file against the float model on up to ``limit``
    calibration samples (batch by batch, so fixed-batch models work too)."""
    import numpy as np
    import onnxruntime as ort

    from smallify import data as data_mod
    from smallify.onnx.calibrate import calibration_batch_size, check_calibration_inputs
    from smallify.onnx.graph import input_names

    names = input_names(model)
    if isinstance(data, (str, os.PathLike)):
        data = data_mod.load_npz(data)
    if isinstance(data, dict) and all(isinstance(v, np.ndarray) for v in data.values()):
        data = check_calibration_inputs(model, dict(data))
    batches = list(data_mod.batches(data, names, calibration_batch_size(model), limit))

    def run(path: str) -> np.ndarray:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        kinds = {i.name: i.type for i in sess.get_inputs()}
        outs = [sess.run(None, {k: v.numpy().astype(np.float32) if "float" in kinds[k] else v.numpy()
                                for k, v in b.items()})[0] for b in batches]
        return np.concatenate([o.ravel() for o in outs]).astype(np.float64)

    reference = run(float_path)

    def metric(path: str) -> float:
        err = np.sum((reference - run(path)) ** 2)
        return float("inf") if err == 0 else float(10 * np.log10(np.sum(reference ** 2) / err))
    return metric


def mixed_onnx(model_or_path, config: MixedPrecision, data, eval_fn, out=None, progress: bool = True):
    """``quantize`` for an ONNX model with ``MixedPrecision``; ``eval_fn(path of an ONNX file) -> metric``
    (without one: output SQNR in dB against the float model on the calibration data, relative to all-INT8)."""
    import tempfile


    from smallify.onnx import io as onnx_io
    from smallify.onnx.io import save_onnx
    from smallify.onnx.graph import weight_layers
    from smallify.onnx.prepare import normalize, preprocess
    from smallify.onnx.quantize import quantize_onnx
    from smallify.train import call_metric

    if out is not None:
        onnx_io.check_writable(out)
    model = onnx_io.load(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    model = normalize(model)        # the float reference must run in ONNX Runtime too (old opsets converted)
    cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "float.onnx")
        save_onnx(model, src)          # external data for models over 1 GB
        sqnr = eval_fn is None
        if sqnr:     # without eval_fn: output SQNR (dB) on the calibration data; all-INT8 is the reference
            eval_fn = sqnr_metric(src, model, data)
        else:
            reference = call_metric(eval_fn, src)
        _, report = quantize_onnx(model, config.base({}), data, None, progress, cache)
        quantized = set(report.quantized)
        pre = preprocess(model)
        dims = {i.name: list(i.dims) for i in pre.graph.initializer}
        layers = {name: math.prod(dims[node.input[w]]) for node, w, name, _ in weight_layers(pre) if name in quantized}

        def evaluate(plan: dict) -> float:
            path = os.path.join(tmp, "trial.onnx")
            quantize_onnx(model, config.base(plan), data, path, False, cache)
            return call_metric(eval_fn, path)

        if sqnr:
            reference = evaluate({n: config.candidates[0] for n in layers})

        plan = search(layers, evaluate, reference, config, progress)
    proto, report = quantize_onnx(model, config.base(plan.bits), data, out, False, cache)
    report.config, report.plan = config.to_dict(), plan
    return proto, report, plan
