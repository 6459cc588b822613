"""Times one ONNX model in this process and prints JSON {"median_ms", "p90_ms", "runs"}; run by path
(``python child_timer.py MODEL RUNTIME BATCH THREADS SECONDS``) so that the fresh process imports only numpy and
the runtime, not smallify and torch (seconds of start-up per model otherwise). Used by measure/isolated.py."""
import json
import sys
import time

import numpy as np


def _feed(inputs, batch: int) -> dict:
    """Random inputs for an ONNX Runtime input list, batch axis set to ``batch`` (as latency.random_feed)."""
    rng = np.random.default_rng(0)
    feed = {}
    for i in inputs:
        shape = [batch if k == 0 else (d if isinstance(d, int) else 1) for k, d in enumerate(i.shape)]
        feed[i.name] = rng.standard_normal(shape).astype(np.float32) if "float" in i.type \
            else rng.integers(0, 100, shape).astype(np.int64)
    return feed


def _fp8_activations(path: str) -> bool:
    import onnx

    model = onnx.load(path, load_external_data=False)
    fp8 = {i.name for i in model.graph.initializer
           if i.data_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in fp8 for n in model.graph.node)


def measure(path: str, runtime: str, batch: int, threads: int, seconds: float) -> dict:
    if path.endswith(".xml"):          # an OpenVINO IR (e.g. NNCF's output): OpenVINO only
        return _measure_ir(path, batch, threads, seconds)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if _fp8_activations(path):     # ORT's MatMulIntegerToFloat fusion rejects FP8 QuantizeLinear
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = _feed(session.get_inputs(), batch)
    if runtime == "onnxruntime":
        output = [session.get_outputs()[0].name]
        run = lambda: session.run(output, feed)          # noqa: E731
    else:
        import openvino as ov

        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        request, values = compiled.create_infer_request(), list(feed.values())
        del session
        run = lambda: request.infer(values)              # noqa: E731
    return _loop(run, seconds)


def _measure_ir(path: str, batch: int, threads: int, seconds: float) -> dict:
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    rng, values = np.random.default_rng(0), []
    for port in compiled.inputs:
        dims = [batch if k == 0 else (d.get_length() if d.is_static else 1) for k, d in enumerate(port.get_partial_shape())]
        values.append(rng.standard_normal(dims).astype(np.float32))
    request = compiled.create_infer_request()
    return _loop(lambda: request.infer(values), seconds)


def _loop(run, seconds: float) -> dict:
    for _ in range(3):
        run()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "runs": len(ms)}


if __name__ == "__main__":
    path, runtime, batch, threads, seconds = sys.argv[1:6]
    print(json.dumps(measure(path, runtime, int(batch), int(threads), float(seconds))))
