"""INT8 quantization of a real transformer (MiniLM-L6 sentence embeddings), smallify against the peers, one run.

    python benchmarks/ptq_minilm.py [--budget 10] [--threads 2]

Calibration: 128 real sentences; evaluation: mean cosine similarity to the PyTorch FP32 embeddings over 256
other real sentences (first sentences of Python standard-library docstrings), sequence length 128.
Latency at batch 1 and 32, every model in one interleaved loop, same threads. Ratios are to ONNX Runtime FP32.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import smallify as sm
from smallify.bench import Row, print_table
from smallify.examples import minilm
from smallify.examples.sentences import sentences
from smallify.measure import bench_interleaved, file_size, openvino_runner, ort_runner, torch_runner

warnings.filterwarnings("ignore")
logging.getLogger("nncf").setLevel(logging.ERROR)
NAMES = ["input_ids", "attention_mask"]


def embed(run, data: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    n = len(data["input_ids"])
    return np.concatenate([np.asarray(run({k: v[i:i + batch] for k, v in data.items()})) for i in range(0, n, batch)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", default="out/bench/ptq_minilm.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = minilm.load()
    texts = sentences()
    calib = minilm.tokenize(tok, texts[:128], args.seq)
    evals = minilm.tokenize(tok, texts[128:384], args.seq)
    rows: dict[str, Row] = {}
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = work / "minilm.fp32.onnx"
        sm.export_onnx(model, fp32, tuple(torch.from_numpy(calib[k][:2]) for k in NAMES), input_names=NAMES)

        def add(name, run, size, seconds=None):
            rows[name] = Row(name, size)
            if seconds is not None:
                rows[name].metrics["quantize_s"] = seconds
            runners[name] = run

        add("ONNX Runtime FP32", ort_runner(fp32, args.threads)[0], file_size(fp32))
        add("PyTorch FP32", torch_runner(model, args.threads), None)
        add("OpenVINO FP32 (default BF16)", openvino_runner(fp32, args.threads), file_size(fp32))

        t0 = time.perf_counter()
        res = sm.quantize(str(fp32), sm.Int8Static(), calib, out=work / "smallify.onnx", progress=False)
        t_sm = time.perf_counter() - t0
        print(res.report)
        add("smallify INT8 → ONNX Runtime", ort_runner(work / "smallify.onnx", args.threads)[0],
            file_size(work / "smallify.onnx"), t_sm)
        add("smallify INT8 → OpenVINO", openvino_runner(work / "smallify.onnx", args.threads),
            file_size(work / "smallify.onnx"))

        t0 = time.perf_counter()
        sm.quantize(str(fp32), sm.Int8Dynamic(), out=work / "smallify_dynamic.onnx")
        add("smallify INT8 dynamic → ONNX Runtime", ort_runner(work / "smallify_dynamic.onnx", args.threads)[0],
            file_size(work / "smallify_dynamic.onnx"), time.perf_counter() - t0)
        t0 = time.perf_counter()
        sm.quantize(str(fp32), sm.WeightOnly(bits=4, group_size=32), out=work / "smallify_int4.onnx")
        add("smallify weight-only INT4 g32 → ONNX Runtime", ort_runner(work / "smallify_int4.onnx", args.threads)[0],
            file_size(work / "smallify_int4.onnx"), time.perf_counter() - t0)

        from onnxruntime.quantization import QuantType, quantize_dynamic
        t0 = time.perf_counter()
        quantize_dynamic(str(fp32), str(work / "ort_dynamic.onnx"), weight_type=QuantType.QInt8)
        add("ORT quantize_dynamic", ort_runner(work / "ort_dynamic.onnx", args.threads)[0],
            file_size(work / "ort_dynamic.onnx"), time.perf_counter() - t0)
        try:
            import nncf
            import openvino as ov

            t0 = time.perf_counter()
            ovm = ov.convert_model(str(fp32))
            items = [{k: calib[k][i:i + 1] for k in NAMES} for i in range(len(calib["input_ids"]))]
            q = nncf.quantize(ovm, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
            ov.save_model(q, str(work / "nncf.xml"))
            add("NNCF INT8 (transformer) → OpenVINO", openvino_runner(work / "nncf.xml", args.threads),
                file_size(work / "nncf.xml") + file_size(work / "nncf.bin"), time.perf_counter() - t0)
        except ImportError as e:
            print(f"NNCF/OpenVINO missing ({e})", file=sys.stderr)

        reference = embed(runners["PyTorch FP32"], evals)
        for name, run in runners.items():
            rows[name].metrics["cosine"] = minilm.mean_cosine(reference, embed(run, evals))
        for b in (1, 32):
            feed = {k: evals[k][:b] for k in NAMES}
            stats = bench_interleaved(runners, {n: feed for n in runners}, budget_s=args.budget)
            for name, st in stats.items():
                rows[name].latency_ms[b] = {"median": st.median_ms, "p90": st.p90_ms}
    table = list(rows.values())
    print_table(table, f"MiniLM-L6, seq {args.seq}, {args.threads} threads; cosine to PyTorch FP32 over 256 sentences; "
                       "ratios to ONNX Runtime FP32")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps([r.__dict__ for r in table], indent=2))


if __name__ == "__main__":
    main()
