"""Run one quantization method on one corpus model and judge the result: output SQNR and cosine against the
float model, the file size ratio, and the integer kernels in ONNX Runtime's optimized graph; a refusal keeps
its one-line reason, anything else is a crash (what the corpus exists to find)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from smallify.examples.onnx_corpus import CorpusModel


INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "QLinearSigmoid", "QLinearConcat", "QLinearLeakyRelu", "QLinearSoftmax",
               "QAttention", "DynamicQuantizeLSTM", "QLinearReduceMean", "QLinearWhere", "GatherBlockQuantized"}


def method_config(method: str, reduce_range="auto"):
    """The config behind each CLI method name the corpus runs (``reduce_range`` for the integer-kernel ones)."""
    import smallify as sm

    return {"int8": lambda: sm.Int8Static(reduce_range=reduce_range),
            "w4a8": lambda: sm.Int8Static(weight_bits=4),
            "weight-only": lambda: sm.WeightOnly(bits=4),
            "dynamic": lambda: sm.Int8Dynamic(reduce_range=reduce_range),
            "fp8": lambda: sm.FP8Static(),
            "fp16": lambda: sm.Float16(dtype="fp16"),
            "bf16": lambda: sm.Float16(dtype="bf16"),
            "mixed": lambda: sm.MixedPrecision(size_budget=0.7, reduce_range=reduce_range)}[method]()


METHODS = ("int8", "w4a8", "weight-only", "dynamic", "fp8", "fp16", "bf16", "mixed")


@dataclass
class Outcome:
    model: str
    method: str
    status: str                     # ok | refused | crash
    message: str = ""
    sqnr: float = float("nan")      # dB, output against the float model
    cosine: float = float("nan")
    size_ratio: float = float("nan")
    integer_kernels: int = 0        # integer / low-bit kernels in ONNX Runtime's optimized graph
    float_layers: list[str] = field(default_factory=list)


def run_onnx(path, feeds: dict[str, np.ndarray], level: str = "all") -> np.ndarray:
    """The first output of ``path`` on ``feeds``, in ONNX Runtime's CPU provider, batch by batch."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if level == "basic":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    n = len(next(iter(feeds.values())))
    step = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else n      # a fixed batch: chunks of it
    outs = [sess.run(None, {i.name: feeds[i.name][s:s + step] for i in inputs})[0]
            for s in range(0, n - step + 1, step)]
    return np.concatenate(outs).astype(np.float64)


def kernels(path) -> dict[str, int]:
    """Operator counts of ONNX Runtime's optimized graph (extended level: fusions, no layout change)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    counts: dict[str, int] = {}
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def file_bytes(path: Path) -> int:
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


def check(model: CorpusModel, method: str, folder: str | os.PathLike, reduce_range="auto") -> Outcome:
    """Quantize ``model`` with ``method``; compare its output with the float model's."""
    import smallify as sm
    from smallify.onnx.prepare import opset_of

    out = Path(folder) / f"{model.name}.{method}.onnx"
    try:
        config = method_config(method, reduce_range)
        result = sm.quantize(str(model.path), config, data=model.calib, out=str(out), progress=False)
    except sm.SmallifyError as e:
        return Outcome(model.name, method, "refused", str(e))
    except Exception as e:   # noqa: BLE001 - a crash is what the corpus exists to find
        import traceback

        return Outcome(model.name, method, "crash", f"{type(e).__name__}: {e}".splitlines()[0][:300] + " | " +
                       traceback.format_exc().strip().splitlines()[-3][:200])
    feeds = model.feeds or {k: v[:16] for k, v in model.calib.items()}
    float_model = onnx.load(str(model.path))
    if opset_of(float_model) < 7:             # older than ONNX Runtime runs: the reference is onnx's conversion
        ref_path = Path(folder) / f"{model.name}.reference.onnx"
        onnx.save(onnx.version_converter.convert_version(float_model, 13), str(ref_path))
    ref = run_onnx(ref_path if opset_of(float_model) < 7 else model.path, feeds)
    got = run_onnx(out, feeds, "basic" if method == "fp8" else "all")
    err = np.sum((ref - got) ** 2)
    sqnr = float(10 * np.log10(np.sum(ref ** 2) / err)) if err > 0 else float("inf")
    cos = float(np.sum(ref * got) / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-30))
    counts = kernels(out) if method != "fp8" else {}
    report = result.report
    floats = [f"{r.name}: {r.reason}" for r in report.layers if r.status == "float"]
    return Outcome(model.name, method, "ok", "", sqnr, cos, file_bytes(out) / file_bytes(model.path),
                   sum(v for k, v in counts.items() if k in INTEGER_OPS), floats)
