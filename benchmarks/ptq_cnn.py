"""INT8 post-training quantization of CNNs: smallify against ONNX Runtime's quantizer and NNCF, one run.

    python benchmarks/ptq_cnn.py            # or: make bench
    python benchmarks/ptq_cnn.py --only fmnist --budget 5

(a) the bundled Fashion-MNIST ResNet: top-1 on the 10,000 test images, latency at batch 1 and 32, size,
    calibration time; every quantizer gets the same FP32 ONNX file and the same 512 calibration images.
(b) ResNet-18 at 224x224 (random weights: speed and size only), 64 random calibration images.

Peers: ONNX Runtime ``quantize_static`` (QDQ, per-channel) with its default int8 activations and with uint8
activations on a ``quant_pre_process``-ed model; NNCF's ONNX output run in ONNX Runtime; NNCF's OpenVINO
output run in OpenVINO; OpenVINO's own FP32 path (BF16 on AMX CPUs). Ratios are to ONNX Runtime FP32.
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
from smallify.examples import fashion_mnist
from smallify.examples.demo import calibration_images, pretrained_fmnist_resnet, top1
from smallify.examples.models import resnet18
from smallify.measure import bench_interleaved, file_size, openvino_runner, ort_runner, torch_runner

warnings.filterwarnings("ignore")
logging.getLogger("nncf").setLevel(logging.ERROR)


def ort_quantize_static(fp32: Path, out: Path, calib: np.ndarray, uint8: bool) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": calib[i:i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.it, None)

    t0 = time.perf_counter()
    src = fp32
    if uint8:
        src = out.with_suffix(".pre.onnx")
        quant_pre_process(str(fp32), str(src))
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if uint8 else QuantType.QInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - t0


def nncf_onnx(fp32: Path, out: Path, calib: np.ndarray) -> float:
    import nncf
    import onnx

    t0 = time.perf_counter()
    model = onnx.load(str(fp32))
    q = nncf.quantize(model, nncf.Dataset([{"input": calib[i:i + 1]} for i in range(len(calib))]),
                      subset_size=len(calib))
    onnx.save(q, str(out))
    return time.perf_counter() - t0


def nncf_openvino(fp32: Path, out: Path, calib: np.ndarray) -> float:
    import nncf
    import openvino as ov

    t0 = time.perf_counter()
    model = ov.convert_model(str(fp32))
    q = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]), subset_size=len(calib))
    ov.save_model(q, str(out))
    return time.perf_counter() - t0


def ir_size(xml: Path) -> int:
    return file_size(xml) + file_size(xml.with_suffix(".bin"))


def run_case(title: str, model: torch.nn.Module, calib: np.ndarray, work: Path, threads: int, budget: float,
             test: tuple[np.ndarray, np.ndarray] | None, batches=(1, 32), min_runs: int = 20) -> list[Row]:
    example = torch.from_numpy(calib[:1])
    fp32 = work / "fp32.onnx"
    sm.export_onnx(model, fp32, example)
    rows: dict[str, Row] = {}
    runners: dict[str, object] = {}

    def add(name, run, size, calib_s=None):
        rows[name] = Row(name, size)
        if calib_s is not None:
            rows[name].metrics["calib_s"] = calib_s
        runners[name] = run

    add("ONNX Runtime FP32", ort_runner(fp32, threads)[0], file_size(fp32))
    add("PyTorch FP32", torch_runner(model, threads), None)
    add("OpenVINO FP32 (default BF16)", openvino_runner(fp32, threads), file_size(fp32))

    t0 = time.perf_counter()
    qmodel = sm.quantize(model, sm.Int8Static(), torch.from_numpy(calib), progress=False)
    sm.export_onnx(qmodel, work / "smallify.onnx", example)
    t_sm = time.perf_counter() - t0
    add("smallify INT8 → ONNX Runtime", ort_runner(work / "smallify.onnx", threads)[0], file_size(work / "smallify.onnx"), t_sm)

    t0 = time.perf_counter()
    sm.quantize(str(fp32), sm.Int8Static(), {"input": calib}, out=work / "smallify_onnxpath.onnx", progress=False)
    add("smallify INT8 (ONNX in) → ONNX Runtime", ort_runner(work / "smallify_onnxpath.onnx", threads)[0],
        file_size(work / "smallify_onnxpath.onnx"), time.perf_counter() - t0)
    add("smallify INT8 → OpenVINO", openvino_runner(work / "smallify.onnx", threads), file_size(work / "smallify.onnx"))

    for uint8 in (False, True):
        name = f"ORT quantize_static ({'u8 act, pre-processed' if uint8 else 'default s8 act'})"
        path = work / f"ort_{'u8' if uint8 else 's8'}.onnx"
        try:
            add(name, None, None, ort_quantize_static(fp32, path, calib, uint8))
            rows[name].size_bytes = file_size(path)
            runners[name] = ort_runner(path, threads)[0]
        except Exception as e:  # a peer failing is reported, not fatal
            print(f"{name}: failed: {e}", file=sys.stderr)
            rows.pop(name), runners.pop(name)
    try:
        s = nncf_onnx(fp32, work / "nncf.onnx", calib)
        add("NNCF INT8 (ONNX) → ONNX Runtime", ort_runner(work / "nncf.onnx", threads)[0], file_size(work / "nncf.onnx"), s)
        s = nncf_openvino(fp32, work / "nncf.xml", calib)
        add("NNCF INT8 → OpenVINO", openvino_runner(work / "nncf.xml", threads), ir_size(work / "nncf.xml"), s)
    except ImportError as e:
        print(f"NNCF/OpenVINO not installed ({e}); pip install nncf openvino", file=sys.stderr)

    if test is not None:
        xte, yte = test
        for name, run in runners.items():
            rows[name].metrics["top1"] = top1(run, xte, yte)
    for b in batches:
        feed = {"input": np.repeat(calib[:1], b, 0) if len(calib) < b else calib[:b]}
        stats = bench_interleaved(runners, {n: feed for n in runners}, budget_s=budget, min_runs=min_runs)
        for name, st in stats.items():
            rows[name].latency_ms[b] = {"median": st.median_ms, "p90": st.p90_ms}
    table = list(rows.values())
    print_table(table, f"{title} — {threads} threads, ratios to ONNX Runtime FP32")
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=12.0, help="seconds of interleaved timing per batch size")
    ap.add_argument("--only", choices=["fmnist", "resnet18"], default=None)
    ap.add_argument("--min-runs", type=int, default=20, help="timed calls per model and batch size, at least")
    ap.add_argument("--json", default="out/bench/ptq_cnn.json")
    ap.add_argument("--keep", default=None, help="write the models to this folder (kept) instead of a temporary one")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        if args.only in (None, "fmnist"):
            work = Path(tmp) / "fmnist"
            work.mkdir(exist_ok=True)
            xte, yte = fashion_mnist.load("test")
            rows = run_case("(a) Fashion-MNIST ResNet, 10,000 test images, 512 calibration images",
                            pretrained_fmnist_resnet(), calibration_images(512), work, args.threads, args.budget,
                            (fashion_mnist.normalize(xte), yte), min_runs=args.min_runs)
            results["fmnist"] = [r.__dict__ for r in rows]
        if args.only in (None, "resnet18"):
            work = Path(tmp) / "resnet18"
            work.mkdir(exist_ok=True)
            torch.manual_seed(0)
            model = resnet18().eval()
            calib = np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)
            rows = run_case("(b) ResNet-18 224×224 (random weights), 64 calibration images", model, calib, work,
                            args.threads, args.budget, None, min_runs=args.min_runs)
            results["resnet18"] = [r.__dict__ for r in rows]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
