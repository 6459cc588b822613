"""``smallify compress`` on the bundled Fashion-MNIST ResNet against NNCF INT8 and ONNX Runtime's quantizer, in
one run (one command):

    python benchmarks/compress.py [--objective latency|size] [--runtime openvino] [--budget 30] [--epochs 2]
    python benchmarks/compress.py --model minilm --max-drop 0.01 [--objective latency|size]

The search chooses by top-1 on the last 5,000 training images (distillation never sees them; the max drop is in
points of top-1 %) and the table reports top-1 on the 10,000 test images. Peers: NNCF's post-training INT8
(``nncf.quantize`` on the OpenVINO model, 512 calibration images, saved as OpenVINO IR) and ONNX Runtime's
``quantize_static`` (QDQ, per channel, uint8 activations). Every model timed on the target runtime with 2
threads, each in its own process, models alternating, 3 rounds (medians); ratios to NNCF INT8. With --objective size, the
candidates built by a latency run before are reused (copied from compress-latency/). The search's
report (out/bench/compress-<objective>/report.html) shows the peers' points beside the candidates.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from ptq_cnn import (  # the same peer runs as benchmarks/ptq_cnn.py
    ir_size,
    nncf_openvino,
    ort_quantize_static,
)

import smallify as sm
from smallify.bench import wide_console
from smallify.examples import compress_example as ex
from smallify.examples.demo import calibration_images, pretrained_fmnist_resnet
from smallify.measure.isolated import bench_isolated
from smallify.measure.machine import cpu_summary
from smallify.measure.size import file_size, format_bytes

logging.getLogger("nncf").setLevel(logging.ERROR)


def ir_top1(xml: Path, x: np.ndarray, y: np.ndarray) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": 2})
    correct = sum(int((compiled(x[i:i + 500])[0].argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
    return 100.0 * correct / len(x)


def size_of(path: Path) -> int:
    return ir_size(path) if path.suffix == ".xml" else file_size(path)


def minilm_part(args) -> None:
    """MiniLM-L6 as an ONNX file (quantization candidates): the bound is mean cosine >= 1 - max drop to the
    float embeddings on 256 real sentences; NNCF INT8 in its transformer mode as the peer."""
    import os

    import nncf
    import openvino as ov
    import torch

    from smallify.examples import minilm
    from smallify.examples.sentences import sentences

    names = ["input_ids", "attention_mask"]
    work = args.out / f"compress-minilm-{args.objective}"
    peers_dir = args.out / "compress-minilm-peers"
    peers_dir.mkdir(parents=True, exist_ok=True)
    model, tok = minilm.load()
    texts = sentences()
    calib, evals = minilm.tokenize(tok, texts[:128], 128), minilm.tokenize(tok, texts[128:384], 128)
    fp32 = peers_dir / "minilm.fp32.onnx"
    sm.export_onnx(model, fp32, tuple(torch.from_numpy(calib[k][:2]) for k in names), input_names=names)
    with torch.no_grad():
        ref = torch.cat([model(*(torch.from_numpy(evals[k][i:i + 32]) for k in names))
                         for i in range(0, len(evals["input_ids"]), 32)]).numpy()
    np.savez(peers_dir / "ref.npz", reference=ref, **{k: evals[k] for k in names})
    os.environ["SMALLIFY_MINILM_REF"] = str(peers_dir / "ref.npz")
    items = [{k: calib[k][i:i + 1] for k in names} for i in range(len(calib["input_ids"]))]
    q = nncf.quantize(ov.convert_model(str(fp32)), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=len(items))
    ov.save_model(q, str(peers_dir / "nncf.xml"))
    compiled = ov.Core().compile_model(str(peers_dir / "nncf.xml"), "CPU", {"INFERENCE_NUM_THREADS": 2})
    nncf_emb = np.concatenate([compiled([evals[k][i:i + 32] for k in names])[0]
                               for i in range(0, len(ref), 32)])
    nncf_cos = minilm.mean_cosine(ref, nncf_emb)
    t0 = time.perf_counter()
    goal = sm.Goal(max_drop=args.max_drop, metric=ex.minilm_cosine, metric_name="mean cosine",
                   objective=args.objective, runtime=args.runtime, batch=(1, 32), budget_minutes=args.budget)
    peer_t = bench_isolated({"NNCF INT8": str(peers_dir / "nncf.xml")}, (1, 32), args.runtime, 2, 1.0, 2)
    peers = [{"name": "NNCF INT8 (transformer)", "metric": nncf_cos, "drop": 1.0 - nncf_cos,
              "latency_ms": {str(b): peer_t["NNCF INT8", b] for b in (1, 32)}, "size_bytes": size_of(peers_dir / "nncf.xml")}]
    result = sm.compress(str(fp32), goal, {k: calib[k] for k in names}, out=work, peers=peers,
                         command="python benchmarks/compress.py " + " ".join(sys.argv[1:]))
    search_s = time.perf_counter() - t0
    print(result)
    ours = work / ("best.onnx" if result.bound_met else "closest.onnx")
    models = {"float (ONNX)": fp32, "NNCF INT8 (transformer)": peers_dir / "nncf.xml",
              f"smallify compress: {result.chosen['name']}": ours}
    timing = bench_isolated({k: str(v) for k, v in models.items()}, (1, 32), args.runtime, 2, 2.0, 3)
    cos = {"float (ONNX)": ex.minilm_cosine(fp32), "NNCF INT8 (transformer)": nncf_cos,
           f"smallify compress: {result.chosen['name']}": ex.minilm_cosine(ours)}
    from rich.table import Table

    ref_name = "NNCF INT8 (transformer)"
    t = Table(title=f"compress MiniLM-L6 (seq 128), objective {args.objective}, {args.runtime} 2 threads, each model in "
              f"its own process, 3 rounds; ratios to NNCF INT8; search {search_s / 60:.1f} min", caption=cpu_summary())
    for col in ("model", "mean cosine", "size", "x size", "b1 ms", "x b1", "b32 ms", "x b32"):
        t.add_column(col, justify="left" if col == "model" else "right", overflow="fold")
    for name, path in models.items():
        size = size_of(path)
        t.add_row(name, f"{cos[name]:.4f}", format_bytes(size), f"{size / size_of(models[ref_name]):.3f}",
                  f"{timing[name, 1]:.2f}", f"{timing[name, 1] / timing[ref_name, 1]:.2f}",
                  f"{timing[name, 32]:.1f}", f"{timing[name, 32] / timing[ref_name, 32]:.2f}")
    wide_console().print(t)
    print(f"report: {work / 'report.html'}; bound met: {result.bound_met}; search {search_s:.0f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", default="latency", choices=("latency", "size"))
    ap.add_argument("--runtime", default="openvino", choices=("openvino", "onnxruntime"))
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--budget", type=float, default=30.0, help="minutes for the search")
    ap.add_argument("--epochs", type=float, default=2.0, help="distillation epochs per fine-tuned candidate")
    ap.add_argument("--finetune", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3, help="distillation learning rate (AdamW, cosine)")
    ap.add_argument("--families", default="quantize,prune,decompose,cluster")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--model", default="fmnist", choices=("fmnist", "minilm"))
    args = ap.parse_args(argv)
    if args.model == "minilm":
        return minilm_part(args)
    work = args.out / f"compress-{args.objective}"
    peers_dir = args.out / "compress-peers"
    peers_dir.mkdir(parents=True, exist_ok=True)
    reuse = args.out / "compress-latency"
    if args.objective == "size" and (reuse / "candidates").is_dir() and not (work / "candidates").exists():
        import shutil  # the candidates both searches try are built once

        for part in ("candidates", "cache"):
            if (reuse / part).is_dir():
                shutil.copytree(reuse / part, work / part)
    model = pretrained_fmnist_resnet()
    calib = calibration_images(512)
    fp32 = peers_dir / "fp32.onnx"
    sm.export_onnx(model, fp32, __import__("torch").from_numpy(calib[:1]))
    print(f"peers: NNCF INT8 ({nncf_openvino(fp32, peers_dir / 'nncf.xml', calib):.1f} s), ONNX Runtime quantizer "
          f"({ort_quantize_static(fp32, peers_dir / 'ort.onnx', calib, uint8=True):.1f} s)", file=sys.stderr)
    xh, yh = ex._split("heldout")
    xt, yt = ex._split("test")
    peers = {"NNCF INT8": peers_dir / "nncf.xml", "ONNX Runtime quantizer": peers_dir / "ort.onnx"}
    scores = {name: (ir_top1(p, xh, yh), ir_top1(p, xt, yt)) if p.suffix == ".xml" else
              (ex.heldout_top1(p), ex.test_top1(p)) for name, p in peers.items()}
    base_heldout = ex.heldout_top1(fp32)

    t0 = time.perf_counter()
    goal = sm.Goal(max_drop=args.max_drop, metric=ex.heldout_top1, metric_name="top1 % (held-out)",
                   objective=args.objective, runtime=args.runtime, batch=(1, 32), budget_minutes=args.budget,
                   finetune=args.finetune, epochs=args.epochs, lr=args.lr, families=tuple(args.families.split(",")))
    peer_timing = bench_isolated({k: str(v) for k, v in peers.items()}, (1, 32), args.runtime, 2, 1.0, 2)
    peer_points = [{"name": name, "metric": scores[name][0], "drop": base_heldout - scores[name][0],
                    "latency_ms": {str(b): peer_timing[name, b] for b in (1, 32)}, "size_bytes": size_of(p)}
                   for name, p in peers.items()]
    command = "python benchmarks/compress.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = sm.compress(model, goal, calib, train_data=ex.train_data(), out=work, peers=peer_points,
                         command=command)
    search_s = time.perf_counter() - t0
    print(result)

    pick = result.chosen
    ours = work / ("best.onnx" if result.bound_met else "closest.onnx")
    models = {"float (ONNX)": fp32, **peers, f"smallify compress: {pick['name']}": ours}
    timing = bench_isolated({k: str(v) for k, v in models.items()}, (1, 32), args.runtime, 2, 2.0, 3)
    tops = {"float (ONNX)": (base_heldout, ex.test_top1(fp32)), **scores,
            f"smallify compress: {pick['name']}": (ex.heldout_top1(ours), ex.test_top1(ours))}
    sizes = {k: size_of(v) for k, v in models.items()}
    container = {f"smallify compress: {pick['name']}": pick.get("container_bytes")}
    from rich.table import Table

    ref = "NNCF INT8"
    t = Table(title=f"compress, objective {args.objective}, {args.runtime} 2 threads, each model in its own process, "
              f"3 rounds; ratios to NNCF INT8; search {search_s / 60:.1f} min", caption=cpu_summary())
    for col in ("model", "top1 test", "drop (pt)", "top1 held-out", "size", "x size", ".smallify", "b1 ms", "x b1", "b32 ms", "x b32"):
        t.add_column(col, justify="left" if col == "model" else "right", overflow="fold")
    base_test = tops["float (ONNX)"][1]
    for name in models:
        t.add_row(name, f"{tops[name][1]:.2f}", f"{base_test - tops[name][1]:+.2f}", f"{tops[name][0]:.2f}",
                  format_bytes(sizes[name]), f"{sizes[name] / sizes[ref]:.3f}",
                  f"{format_bytes(container[name])} ({container[name] / sizes[ref]:.3f}x)" if container.get(name) else "",
                  f"{timing[name, 1]:.3f}", f"{timing[name, 1] / timing[ref, 1]:.2f}",
                  f"{timing[name, 32]:.2f}", f"{timing[name, 32] / timing[ref, 32]:.2f}")
    wide_console().print(t)
    print(f"report: {work / 'report.html'}; bound met: {result.bound_met}; search {search_s:.0f} s")


if __name__ == "__main__":
    main()
