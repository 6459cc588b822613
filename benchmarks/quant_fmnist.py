"""Every quantization format and workflow on the bundled Fashion-MNIST ResNet, in one table.

    python benchmarks/quant_fmnist.py                 # three QAT runs of one epoch: the longest part
    python benchmarks/quant_fmnist.py --qat-epochs 0  # PTQ rows only

Every model is written as ONNX and scored by ONNX Runtime on the 10,000 test images (FP8 models run with
ORT's 'basic' optimization level, see FP8Static). Calibration: the same 512 training images for every row.
Rows: FP32; INT8 with each calibration method (minmax, percentile, entropy, mse); W4A8 (4-bit weights,
8-bit activations) PTQ and QAT (per channel and per tensor), W3A8 PTQ and QAT (QAT: ``--qat-epochs`` of
AdamW at ``--qat-lr``, LSQ scales, the training set with shifts and flips); mixed precision chosen with max_drop=0.3
points, judged on 5,000 held-out training images (never the test set); weight-only int4; FP8 e4m3/e5m2;
FP16/BF16. Size: the ONNX file, and the ratio to the FP32 file.
"""
from __future__ import annotations

import argparse
import json
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
from smallify.examples.train_fmnist import augment
from smallify.measure import file_size, ort_runner

warnings.filterwarnings("ignore")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--max-drop", type=float, default=0.3, help="mixed precision bound, in top-1 points")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = pretrained_fmnist_resnet()
    xtr, ytr = fashion_mnist.load("train")
    xte, yte = fashion_mnist.load("test")
    xtr, xte = fashion_mnist.normalize(xtr), fashion_mnist.normalize(xte)
    calib = calibration_images(512)
    # held-out split for choices (mixed precision): the last 5,000 training images
    xval = torch.from_numpy(xtr[-5000:])
    yval = torch.from_numpy(ytr[-5000:].astype(np.int64))
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="quant_fmnist_"))
    example = torch.from_numpy(xte[:1])

    def score(name: str, path: Path, **extra) -> None:
        run, _ = ort_runner(path, args.threads)
        acc = top1(run, xte, yte)
        rows.append(Row(name, file_size(path), metrics={"top1": acc, **extra}))
        print(f"{name}: top-1 {acc:.4f}, {file_size(path)} bytes", file=sys.stderr, flush=True)

    def export(qmodel, name: str, **extra) -> None:
        path = tmp / f"{len(rows)}.onnx"
        sm.export_onnx(qmodel, path, example)
        score(name, path, **extra)

    export(model, "FP32")
    for method in ("minmax", "percentile", "entropy", "mse"):
        export(sm.quantize(model, sm.Int8Static(calibration=method), calib, progress=False), f"INT8 PTQ, {method}")

    def val_top1(m) -> float:
        with torch.no_grad():
            return 100.0 * float(sum(int((m(xval[i:i + 1000]).argmax(1) == yval[i:i + 1000]).sum())
                                     for i in range(0, len(xval), 1000)) / len(xval))

    t0 = time.perf_counter()
    mixed = sm.quantize(model, sm.MixedPrecision(max_drop=args.max_drop), calib, progress=False, eval_fn=val_top1)
    plan = mixed.mixed_plan
    export(mixed, f"mixed INT8/INT4 weights, max_drop {args.max_drop} pt (val)", val_drop=(plan.reference - plan.metric) / 100,
           search_s=time.perf_counter() - t0)
    print(plan, file=sys.stderr)
    for bits, per_channel in ((4, True), (4, False), (3, True)):
        gran = "per channel" if per_channel else "per tensor"
        q = sm.quantize(model, sm.Int8Static(weight_bits=bits, per_channel=per_channel), calib, progress=False)
        export(q, f"W{bits}A8 PTQ, {gran}")
        if args.qat_epochs > 0:
            t0 = time.perf_counter()
            data = sm.TrainData(torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.int64)), batch_size=128,
                                augment=augment)
            sm.qat(q, data, sm.TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr), progress=sys.stderr.isatty())
            export(q, f"W{bits}A8 QAT {args.qat_epochs:g} epoch(s), {gran}", train_s=time.perf_counter() - t0)
    export(sm.quantize(model, sm.WeightOnly(bits=4, group_size=None)), "weight-only INT4 per channel (float act.)")
    for fmt in ("e4m3", "e5m2"):
        export(sm.quantize(model, sm.FP8Static(format=fmt), calib, progress=False), f"FP8 {fmt} (W+A)")
    for dtype in ("fp16", "bf16"):
        export(sm.quantize(model, sm.Float16(dtype=dtype)), dtype.upper())
    print_table(rows, "Fashion-MNIST ResNet (bundled), ONNX Runtime, 10,000 test images; sizes relative to FP32")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=float))


if __name__ == "__main__":
    main()
