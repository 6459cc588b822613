"""The main job on the bundled real example: the Fashion-MNIST ResNet, FP32 vs INT8, side by side.

Loads the committed weights, quantizes with 512 training images as calibration data, exports FP32 and INT8
ONNX, and measures top-1 on the 10,000 test images, size on disk and latency at batch 1 and 32 for PyTorch
FP32, ONNX Runtime FP32 and ONNX Runtime INT8 (same threads, interleaved). Prints a table, writes JSON.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file

from smallify.bench import Row, print_table, wide_console, write_json
from smallify.examples import fashion_mnist
from smallify.examples.models import fmnist_resnet
from smallify.measure.latency import bench_interleaved, ort_runner, torch_runner
from smallify.measure.size import file_size

WEIGHTS = "fmnist_resnet.safetensors"


def pretrained_fmnist_resnet() -> torch.nn.Module:
    """The bundled Fashion-MNIST ResNet with its trained weights (safetensors: no code runs on load)."""
    path = importlib.resources.files("smallify.examples") / "weights" / WEIGHTS
    model = fmnist_resnet()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def calibration_images(n: int = 512, root=None, seed: int = 0) -> np.ndarray:
    """``n`` training images (a fixed random draw), normalized, float32 (n, 1, 28, 28)."""
    x, _ = fashion_mnist.load("train", root)
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return fashion_mnist.normalize(x[idx])


def top1(run, x: np.ndarray, y: np.ndarray, batch: int = 500, input_name: str = "input") -> float:
    correct = 0
    for i in range(0, len(x), batch):
        logits = run({input_name: x[i:i + batch]})
        correct += int((np.asarray(logits).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def run_demo(out: str | os.PathLike = "out/demo", threads: int = 2, data=None, budget_s: float = 8.0,
             console: Console | None = None) -> dict:
    import smallify as sm

    console = console or wide_console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    model = pretrained_fmnist_resnet()
    xte, yte = fashion_mnist.load("test", data)
    xte = fashion_mnist.normalize(xte)
    calib = calibration_images(512, data)
    console.print(f"model: Fashion-MNIST ResNet ({sum(p.numel() for p in model.parameters()):,} parameters); "
                  f"calibration: 512 training images; evaluation: {len(xte):,} test images")

    example = torch.from_numpy(xte[:1])
    fp32_path, int8_path = out / "fmnist_resnet.fp32.onnx", out / "fmnist_resnet.int8.onnx"
    sm.export_onnx(model, fp32_path, example)
    qmodel = sm.quantize(model, sm.Int8Static(), torch.from_numpy(calib))
    console.print(str(qmodel.quant_report))
    sm.export_onnx(qmodel, int8_path, example)

    runners = {"PyTorch FP32": torch_runner(model, threads),
               "ONNX Runtime FP32": ort_runner(fp32_path, threads)[0],
               "ONNX Runtime INT8 (smallify)": ort_runner(int8_path, threads)[0]}
    rows = {name: Row(name) for name in runners}
    rows["ONNX Runtime FP32"].size_bytes = file_size(fp32_path)
    rows["ONNX Runtime INT8 (smallify)"].size_bytes = file_size(int8_path)
    pt_path = out / "fmnist_resnet.fp32.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, pt_path)
    rows["PyTorch FP32"].size_bytes = file_size(pt_path)
    for name, run in runners.items():
        rows[name].metrics["top1"] = top1(run, xte, yte)
    for b in (1, 32):
        feed = {"input": xte[:b]}
        stats = bench_interleaved(runners, {n: feed for n in runners}, budget_s=budget_s)
        for name, s in stats.items():
            rows[name].latency_ms[b] = {"median": s.median_ms, "p90": s.p90_ms}
    table = list(rows.values())
    print_table(table, f"Fashion-MNIST ResNet, {threads} thread(s), ratios to PyTorch FP32", console)
    fp, q = rows["ONNX Runtime FP32"], rows["ONNX Runtime INT8 (smallify)"]
    summary = {"top1_drop_points": 100 * (fp.metrics["top1"] - q.metrics["top1"]),
               "int8_size_ratio_to_fp32_onnx": q.size_bytes / fp.size_bytes,
               "int8_latency_ratio_to_ort_fp32": {b: q.latency_ms[b]["median"] / fp.latency_ms[b]["median"] for b in (1, 32)},
               "threads": threads, "quantization": qmodel.quant_report.to_dict()}
    console.print(f"INT8 vs ONNX Runtime FP32: top-1 drop {summary['top1_drop_points']:+.2f} points, "
                  f"size ×{summary['int8_size_ratio_to_fp32_onnx']:.3f}, latency ×"
                  + ", ×".join(f"{v:.2f} (batch {b})" for b, v in summary["int8_latency_ratio_to_ort_fp32"].items()))
    write_json(table, out / "results.json", summary)
    console.print(f"wrote {out / 'results.json'}, {fp32_path}, {int8_path}")
    return {"rows": table, **summary}
