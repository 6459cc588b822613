"""Weight sharing on the bundled Fashion-MNIST ResNet (and MiniLM-L6, HashedNets): sizes, accuracy, latency.

    python benchmarks/weight_sharing.py [--parts pipeline,uniform,binary,forms,hashed,minilm] [--ft-epochs 1]
        [--prune-epochs 2] [--sparsity 0.9] [--bits 4] [--out out/bench/weight_sharing.json] [--redo]

pipeline: Deep Compression's chain on the trained model. (1) unstructured magnitude pruning to ``--sparsity``,
          ramped by the cubic schedule over ``--prune-epochs`` of fine-tuning with distillation from the dense model;
          (2) k-means, 2^``--bits`` shared values per layer over the nonzeros (linear init, importance-weighted on 512
          training images), the centroids fine-tuned ``--ft-epochs`` with distillation; (3) the codebooks put on the
          INT8 grid. Every stage saved with smallify.save: the file's bytes (indices entropy-coded: the smallest of
          bit-packing, Huffman and zstd per layer), against the FP32 safetensors the package ships.
uniform:  k-means against uniform (min-max, asymmetric, per output channel) quantization at 2, 3, 4 bits, the
          same number of levels per channel, first conv (9 weights per channel) in float for both: weight SQNR and
          top-1 before and after the same fine-tuning (``--ft-epochs`` of distillation; uniform: QAT with learned
          step sizes, k-means: the centroids).
binary:   binary (BWN), ternary (TWN) and 2-bit k-means per channel, the first conv and the classifier on 128
          shared values per layer (7 bits: the first conv has only 144 weights), fine-tuned ``--ft-epochs`` with
          distillation.
forms:    the pipeline's model as ONNX: float weights, the index form (codebooks + packed indices in the file) and
          INT8 (Int8Static on the INT8-grid codebooks): file bytes and ONNX Runtime latency at batch 1 and 32, each
          model timed in its own process, 3 rounds.
hashed:   benchmarks/hashednets.py (HashedNets against equal-size dense nets), run as a subprocess.
minilm:   benchmarks/_ws_minilm.py (MiniLM-L6 k-means + distillation on real sentences), run as a subprocess.

Distillation everywhere: KD from the dense model, T = 4, alpha = 0.9, AdamW, cosine, lr ``--lr`` while pruning and
``--ft-lr`` for the centroids / QAT, batch 128, the
training set with the demo's augmentation. Top-1 on the 10,000 test images. Results are kept per part in
``--out`` (a re-run skips finished parts unless ``--redo``).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import smallify as sm
from smallify.bench import Row, print_table
from smallify.cluster import expand, snap_codebooks
from smallify.cluster.kmeans import sqnr_db
from smallify.cluster.modules import SharedTwin
from smallify.distill import kd_loss
from smallify.examples import fashion_mnist
from smallify.examples.demo import WEIGHTS, calibration_images, pretrained_fmnist_resnet
from smallify.examples.train_fmnist import augment
from smallify.measure.machine import cpu_summary
from smallify.pack.container import read_manifest

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
PARTS = ("pipeline", "uniform", "binary", "forms", "hashed", "minilm")


class Bench:
    def __init__(self, args):
        self.args = args
        torch.set_num_threads(args.threads)
        self.teacher = pretrained_fmnist_resnet().eval()
        xtr, ytr = fashion_mnist.load("train")
        xte, yte = fashion_mnist.load("test")
        self.xtr, self.xte = (torch.from_numpy(fashion_mnist.normalize(x)) for x in (xtr, xte))
        self.ytr, self.yte = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
        self.data = sm.TrainData(self.xtr, self.ytr, batch_size=128, augment=augment)
        self.calib = torch.from_numpy(calibration_images(512))
        self.tmp = Path(tempfile.mkdtemp(prefix="weight_sharing_"))
        self.progress = sys.stderr.isatty()
        self.model_file = Path(args.out).with_suffix(".pipeline.smallify")     # the forms part reads it
        import smallify.examples as ex

        self.fp32_bytes = (Path(ex.__file__).parent / "weights" / WEIGHTS).stat().st_size
        self.fp32_top1 = self.top1(self.teacher)

    @torch.no_grad()
    def top1(self, m) -> float:
        m.eval()
        return sum(int((m(self.xte[i:i + 1000]).argmax(1) == self.yte[i:i + 1000]).sum())
                   for i in range(0, 10000, 1000)) / 10000

    def kd(self, out, y, x):
        with torch.no_grad():
            t = self.teacher(x)
        return 0.9 * kd_loss(out, t, 4.0) + 0.1 * torch.nn.functional.cross_entropy(out, y)

    def finetune(self, m, epochs: float | None = None):
        epochs = self.args.ft_epochs if epochs is None else epochs
        if epochs > 0:
            sm.train(m, self.data, sm.TrainConfig(epochs=epochs, lr=self.args.ft_lr), loss_fn=self.kd,
                     progress=self.progress)
        return m.eval()

    def saved(self, m, name: str) -> tuple[int, dict]:
        path = sm.save(m, self.tmp / f"{name}.smallify")
        back = sm.load(path, pretrained_fmnist_resnet())
        with torch.no_grad():
            diff = float((back.eval()(self.xte[:256]) - m.eval()(self.xte[:256])).abs().max())
        # shared models load bit-exact; a QAT model (uniform rows) within float rounding (2.4e-7 measured)
        assert diff <= 1e-5, f"{name}: the loaded file's output differs from the saved model's by {diff}"
        return path.stat().st_size, read_manifest(path)["bytes"]

    def row(self, name, m, extra=None) -> dict:
        size, parts = self.saved(m, name)
        top1 = self.top1(m)
        rec = {"name": name, "bytes": size, "x_smaller": self.fp32_bytes / size, "top1": top1,
               "drop_pts": 100 * (self.fp32_top1 - top1), "breakdown": parts, **(extra or {})}
        print(f"  {name}: {size} B ({rec['x_smaller']:.1f}x smaller), top-1 {top1:.4f}", flush=True)
        return rec


def table(rows: list[dict], title: str, fp32_bytes: int) -> None:
    shown = [Row(r["name"], r["bytes"], metrics={k: r[k] for k in ("top1", "drop_pts", "x_smaller", "sqnr_db")
                                                 if k in r}) for r in rows]
    print_table([Row("FP32 safetensors (bundled)", fp32_bytes, metrics={})] + shown, title)


def pipeline(b: Bench) -> dict:
    a = b.args
    rows = [{"name": "FP32 .smallify", **dict(zip(("bytes", "breakdown"), b.saved(b.teacher, "fp32"))),
             "top1": b.fp32_top1, "drop_pts": 0.0}]
    t0 = time.perf_counter()
    pruned = sm.prune_gradually(b.teacher, b.data, sm.Unstructured(sparsity=a.sparsity),
                                sm.TrainConfig(epochs=a.prune_epochs, lr=a.lr), loss_fn=b.kd, progress=b.progress)
    rows.append(b.row(f"1 pruned {a.sparsity:.0%} (gradual + KD, {a.prune_epochs:g} ep)", pruned,
                      {"seconds": time.perf_counter() - t0, "sparsity": sm.sparsity_of(pruned)}))
    t0 = time.perf_counter()
    shared = sm.cluster(pruned, sm.KMeans(bits=a.bits, scope="layer", snap="int8"), data=b.calib, progress=False)
    rows.append(b.row(f"2 + k-means {2 ** a.bits} per layer (no fine-tuning)", shared,
                      {"seconds": time.perf_counter() - t0}))
    t0 = time.perf_counter()
    b.finetune(shared)
    rows.append(b.row(f"3 + centroids fine-tuned (KD, {a.ft_epochs:g} ep)", shared,
                      {"seconds": time.perf_counter() - t0}))
    snap_codebooks(shared)
    rows.append(b.row("4 + codebooks on the INT8 grid", shared))
    coders = coder_sizes(shared)
    sm.save(shared, b.model_file)
    table(rows, f"Deep Compression pipeline: prune {a.sparsity:.0%} -> k-means {2 ** a.bits} -> INT8 codebooks -> "
          "entropy-coded .smallify", b.fp32_bytes)
    print("index streams, bytes by coder (all layers):", coders)
    return {"rows": rows, "coders": coders, "model_file": str(b.model_file)}


def coder_sizes(model) -> dict[str, int]:
    """Total bytes of every layer's index stream under each coder alone, and under the per-layer best."""
    from smallify.pack.entropy import METHODS, encode, encode_as
    from smallify.pack.shared import symbol_stream

    totals = {m: 0 for m in METHODS}
    totals["best per layer"] = 0
    for m in model.modules():
        if isinstance(m, SharedTwin):
            sym, alphabet = symbol_stream(m)
            for method in METHODS:
                totals[method] += len(encode_as(method, sym, alphabet))
            totals["best per layer"] += len(encode(sym, alphabet)[1])
    return totals


def uniform(b: Bench) -> dict:
    rows = []
    for bits in (2, 3, 4):
        for method in ("uniform", "k-means"):
            t0 = time.perf_counter()
            if method == "uniform":
                m = sm.quantize(b.teacher, sm.WeightOnly(bits=bits, group_size=None, symmetric=False, skip=("stem.0",)),
                                progress=False)
            else:
                m = sm.cluster(b.teacher, sm.KMeans(bits=bits, scope="channel", skip=("stem.0",)), data=b.calib,
                               progress=False)
            before, sqnr = b.top1(m), weight_sqnr(b.teacher, m)
            if method == "uniform":
                sm.qat(m, b.data, sm.TrainConfig(epochs=b.args.ft_epochs, lr=b.args.ft_lr), loss_fn=b.kd,
                       progress=b.progress)
            else:
                b.finetune(m)
            rec = b.row(f"{method} {bits}-bit per channel", m, {"sqnr_db": sqnr, "top1_before_ft": before,
                                                                "seconds": time.perf_counter() - t0})
            rows.append(rec)
    table(rows, f"k-means vs uniform at the same levels per channel (first conv float); top-1 after {b.args.ft_epochs:g} "
          "ep of KD fine-tuning; SQNR of the weights before it", b.fp32_bytes)
    print(" " * 2 + "top-1 before fine-tuning: " + ", ".join(f"{r['name']}: {r['top1_before_ft']:.4f}" for r in rows))
    return {"rows": rows}


def weight_sqnr(ref, m) -> float:
    """SQNR (dB) of all the compressed layers' weights together against the float model's (BN folded)."""
    from smallify.quant.weight_only import fold_batchnorm

    float_layers = dict(fold_batchnorm(ref).named_modules())
    xs, xh = [], []
    for name, layer in m.named_modules():
        w = layer.qweight() if hasattr(layer, "qweight") else getattr(layer, "weight", None)
        if name in float_layers and isinstance(w, torch.Tensor) and w.ndim >= 2 and name != "stem.0" \
                and not isinstance(layer, torch.nn.BatchNorm2d):
            xs.append(float_layers[name].weight.detach().flatten())
            xh.append(w.detach().flatten())
    return sqnr_db(torch.cat(xs), torch.cat(xh))


def binary(b: Bench) -> dict:
    rows = []
    ends = ("stem.0", "fc")
    for label, config in (("binary (BWN)", sm.Binary(skip=ends)), ("ternary (TWN)", sm.Ternary(skip=ends)),
                          ("k-means 2-bit", sm.KMeans(bits=2, scope="channel", skip=ends))):
        t0 = time.perf_counter()
        m = sm.cluster(b.teacher, config, data=b.calib, progress=False)
        m = sm.cluster(m, sm.KMeans(clusters=128, scope="layer"), data=b.calib, progress=False)   # the two ends
        m.cluster_config = config
        before = b.top1(m)
        b.finetune(m)
        rows.append(b.row(f"{label} per channel, ends 128 values", m, {"top1_before_ft": before,
                                                                       "seconds": time.perf_counter() - t0}))
    table(rows, f"binary / ternary / 2-bit k-means, fine-tuned {b.args.ft_epochs:g} ep with KD", b.fp32_bytes)
    return {"rows": rows}


def forms(b: Bench, results: dict) -> dict:
    from smallify.bench import bench_onnx_files

    model_file = b.model_file
    if not model_file.is_file():
        print(f"forms: no {model_file} (the pipeline part writes it); running the pipeline part first")
        results["pipeline"] = pipeline(b)
    shared = sm.load(model_file, pretrained_fmnist_resnet())
    example = b.xte[:1]
    paths = {"fp32": b.tmp / "fp32.onnx", "shared, float weights": b.tmp / "expand.onnx",
             "shared, index form": b.tmp / "indices.onnx", "shared, INT8": b.tmp / "int8.onnx"}
    sm.export_onnx(b.teacher, paths["fp32"], example)
    sm.export_onnx(shared, paths["shared, float weights"], example, shared="expand")
    sm.export_onnx(shared, paths["shared, index form"], example, shared="indices")
    q = sm.quantize(expand(copy.deepcopy(shared)), sm.Int8Static(), data=b.calib, progress=False)
    sm.export_onnx(q, paths["shared, INT8"], example)
    accuracy = {label: onnx_top1(b, p) for label, p in paths.items()}
    rows = bench_onnx_files([str(p) for p in paths.values()], [1, 32], threads=b.args.threads, rounds=3)
    for r, label in zip(rows, paths):
        r.name = label
        r.metrics["top1"] = accuracy[label]
    print_table(rows, "the pipeline's model as ONNX: sizes and ONNX Runtime latency (each model in its own process)")
    return {"rows": [{"name": r.name, "bytes": r.size_bytes, "latency_ms": r.latency_ms, "top1": r.metrics["top1"]}
                     for r in rows]}


def onnx_top1(b: Bench, path) -> float:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    hits = sum(int((s.run(None, {name: b.xte[i:i + 1000].numpy()})[0].argmax(1) == b.yte[i:i + 1000].numpy()).sum())
               for i in range(0, 10000, 1000))
    return hits / 10000


def subprocess_part(script: str, out: Path, flag: str = "--out") -> dict:
    cmd = [sys.executable, str(HERE / script), flag, str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--ft-epochs", type=float, default=1.0)
    ap.add_argument("--prune-epochs", type=float, default=2.0)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3, help="pruning's fine-tuning")
    ap.add_argument("--ft-lr", type=float, default=2e-4, help="fine-tuning of centroids, scales, QAT (AdamW moves every "
                    "parameter by ~lr per step: 2e-3 moved the small centroids too far)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench/weight_sharing.json")
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; accepted: {', '.join(PARTS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = cpu_summary()
    print(cpu_summary(), flush=True)
    bench = None
    for part in parts:
        if part in results and not args.redo:
            print(f"{part}: done in {out} (--redo to run it again)")
            continue
        t0 = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "hashed":
            results[part] = subprocess_part("hashednets.py", out.with_name("hashednets.json"), "--json")
        elif part == "minilm":
            results[part] = subprocess_part("_ws_minilm.py", out.with_name("ws_minilm.json"))
        else:
            bench = bench or Bench(args)
            results["fp32"] = {"bytes": bench.fp32_bytes, "top1": bench.fp32_top1}
            fn = {"pipeline": pipeline, "uniform": uniform, "binary": binary}.get(part)
            results[part] = fn(bench) if fn else forms(bench, results)
        results[part]["seconds"] = time.perf_counter() - t0
        results[part]["settings"] = {k: v for k, v in vars(args).items() if k not in ("parts", "redo", "out")}
        out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
