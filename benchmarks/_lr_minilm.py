"""Activation-aware SVD of the real MiniLM-L6's encoder, recovered by distillation on real sentences.

    nice -n 10 python benchmarks/_lr_minilm.py [--macs 0.6,0.5] [--epochs 2] [--lr 1e-4] [--out out/bench/lr_minilm.json]

A part of ``benchmarks/low_rank.py`` (run by it as a subprocess), runnable alone. Issue 12's target: >= 25 % less
ONNX Runtime latency at mean cosine >= 0.99 to the original embeddings, and plain SVD against activation-aware SVD
at the same ranks, side by side.

Model: the sentence embedder (mean pooling, L2 norm) of ``examples/minilm.py``. Every Linear of the 6 encoder
layers (query, key, value, attention output, intermediate, output; not the embeddings, not the pooler) is
written as two smaller Linear layers by ``smallify.decompose(model, LowRank(method='svd', macs=M,
layers=('m.encoder.encoder.layer.*',), runtime='onnxruntime', batch=1), data=128 calibration sentences at
sequence 128)``: ``macs`` is the kept share of the whole model's Linear MACs at sequence 128 (the attention
matmuls are not counted), spread over the layers by least output error per saved MAC; the input covariance
whitens each SVD; a layer is kept when its decomposed form is not faster in ONNX Runtime at batch 1, 2 threads.
Plain SVD: the same layers at the same ranks, factored from the weights alone (``svd_factors`` without the
covariance); its output error on the calibration data is reported beside the activation-aware one.
Distillation (as ``prune_minilm.py``): the decomposed encoder learns the original's embeddings (cosine loss)
and every layer's hidden states (mean squared error, ``--feature-weight`` per layer) on ~3,000 other real
sentences (``more_sentences`` minus the evaluation set) at sequence ``--train-seq``, batch 32, AdamW, cosine
schedule, ``--lr``. Evaluation: mean cosine similarity to the original's embeddings over the same 256 held-out
sentences at sequence 128 as ``ptq_minilm.py`` / ``prune_minilm.py``; ONNX Runtime FP32 latency at sequence 128,
batch 1 and 32, ``--threads`` threads, every model timed in its own process (``bench_onnx_files``, 3 rounds,
alternating), after waiting (up to ``--wait`` s) for the 1-minute load average to fall below ``--max-load``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import smallify as sm
from smallify.bench import Row, bench_onnx_files, print_table
from smallify.examples import minilm
from smallify.examples.sentences import more_sentences, sentences
from smallify.files import write_atomic
from smallify.lowrank import LowRank, decompose
from smallify.lowrank.decompose import input_stats
from smallify.lowrank.factor import relative_error, svd_factors
from smallify.lowrank.modules import Decomposed, build
from smallify.measure.machine import cpu_info, cpu_summary

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ws_minilm import embed, stack  # noqa: E402
from prune_minilm import Packed  # noqa: E402  (ids, mask) stacked in one input, as TrainData holds it

NAMES = ["input_ids", "attention_mask"]
LAYERS = ("m.encoder.encoder.layer.*",)      # q, k, v, attention output, intermediate, output of every layer


def plain_twin(teacher: torch.nn.Module, aware: torch.nn.Module) -> torch.nn.Module:
    """``teacher`` with every layer that ``aware`` decomposed written by plain (weight-space) SVD at the same
    ranks."""
    import copy

    plain = copy.deepcopy(teacher)
    for name, m in aware.named_modules():
        if isinstance(m, Decomposed):
            layer = plain.get_submodule(name)
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent), attr, build(layer, svd_factors(layer.weight.detach().double(),
                                                                                m.ranks[0])))
    return plain.eval()


def output_errors(teacher: torch.nn.Module, models: dict[str, torch.nn.Module], calib: torch.Tensor) -> dict:
    """name -> layer -> relative output error trace(dW S dW^T) / trace(W S W^T) on the calibration inputs."""
    names = sorted({n for m in models.values() for n, d in m.named_modules() if isinstance(d, Decomposed)})
    _, moments, _ = input_stats(teacher, {n: teacher.get_submodule(n) for n in names}, calib)
    out = {}
    for label, model in models.items():
        out[label] = {}
        for n in names:
            d = model.get_submodule(n)
            if isinstance(d, Decomposed):
                W = teacher.get_submodule(n).weight.detach().double()
                approx = d[1].weight.detach().double() @ d[0].weight.detach().double()
                out[label][n] = relative_error(W, approx, moments[n])
    return out


def quiet_cpu(max_load: float, wait_s: float) -> float:
    """Wait up to ``wait_s`` for the 1-minute load average to fall below ``max_load``; the load when timing starts."""
    start = time.time()
    while os.getloadavg()[0] >= max_load and time.time() - start < wait_s:
        time.sleep(10)
    return os.getloadavg()[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--macs", default="0.6,0.5", help="kept shares of the model's MACs, comma-separated")
    ap.add_argument("--epochs", type=float, default=2.0, help="distillation epochs (0: none)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--feature-weight", type=float, default=1 / 6)
    ap.add_argument("--train-seq", type=int, default=64)
    ap.add_argument("--max-train", type=int, default=None, help="distil on the first N training sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (0: no timing)")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--wait", type=float, default=180.0, help="seconds to wait for a quiet CPU before timing")
    ap.add_argument("--out", default="out/bench/lr_minilm.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = sys.stderr.isatty()
    start = time.perf_counter()
    budgets = [float(v) for v in args.macs.split(",") if v]
    float_model, tok = minilm.load()
    teacher = Packed(float_model).eval()
    texts = sentences()
    calib = stack(minilm.tokenize(tok, texts[:128], 128))
    evals = stack(minilm.tokenize(tok, texts[128:384], 128))
    train_texts = more_sentences(texts[128:384])[:args.max_train]
    train = stack(minilm.tokenize(tok, train_texts, args.train_seq))
    reference = embed(teacher, evals)
    tmp = Path(tempfile.mkdtemp(prefix="lr_minilm_"))
    results = {"command": " ".join([sys.executable] + sys.argv), "machine": cpu_info(), "cpu": cpu_summary(),
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "train_sentences": len(train_texts), "eval_sentences": len(evals), "settings_run": []}
    layer_names = [f"m.encoder.encoder.layer.{i}.output" for i in range(len(float_model.encoder.encoder.layer))]

    def onnx(model, name) -> Path:
        path = tmp / f"{name}.onnx"
        sm.export_onnx(model.m, path, tuple(evals[:2, i] for i in range(2)), input_names=NAMES)
        return path

    rows = [Row("MiniLM-L6 FP32 (original)", metrics={"cosine": 1.0, "MACs x": 1.0, "params x": 1.0})]
    timed = {rows[0].name: onnx(teacher, "original")}
    for macs in budgets:
        t0 = time.perf_counter()
        config = LowRank(method="svd", macs=macs, layers=LAYERS, runtime="onnxruntime", batch=1, threads=args.threads)
        student = decompose(teacher, config, data=calib, progress=progress)
        decompose_s = time.perf_counter() - t0
        report = student.report
        print(report, file=sys.stderr, flush=True)
        plain = plain_twin(teacher, student)
        errors = output_errors(teacher, {"aware": student, "plain": plain}, calib)
        ranks = {l.name: l.ranks[0] for l in report.layers if l.status == "decomposed"}
        setting = {"macs": macs, "config": config.to_dict(), "report": report.to_dict(), "ranks": ranks,
                   "decompose_s": decompose_s, "output_error": errors,
                   "cosine_aware_before": minilm.mean_cosine(reference, embed(student, evals)),
                   "cosine_plain_before": minilm.mean_cosine(reference, embed(plain, evals))}
        base = {"MACs x": report.macs_after / report.macs_before, "params x": report.params_after / report.params_before}
        mean_err = {k: float(np.mean(list(v.values()))) for k, v in errors.items()}
        setting["mean_output_error"] = mean_err
        label = f"svd macs={macs:g} ({len(ranks)}/36 layers)"
        rows.append(Row(f"{label}: plain SVD, same ranks, no distillation",
                        metrics={"cosine": setting["cosine_plain_before"], **base, "layer error": mean_err["plain"]}))
        rows.append(Row(f"{label}: activation-aware SVD, no distillation",
                        metrics={"cosine": setting["cosine_aware_before"], **base, "layer error": mean_err["aware"]}))
        print(f"{label}: cosine plain {setting['cosine_plain_before']:.4f}, aware {setting['cosine_aware_before']:.4f}"
              f" before distillation; mean layer output error plain {mean_err['plain']:.4f}, aware "
              f"{mean_err['aware']:.4f}", file=sys.stderr, flush=True)
        if args.epochs > 0:
            t0 = time.perf_counter()
            student.train()
            sm.distill(student, teacher, sm.TrainData(train, None, batch_size=32),
                       sm.KD(output_loss="cosine", alpha=1.0, features={n: n for n in layer_names},
                             feature_weight=args.feature_weight),
                       sm.TrainConfig(epochs=args.epochs, lr=args.lr), progress=progress)
            student.eval()
            setting["distill_s"] = time.perf_counter() - t0
            setting["cosine_after"] = minilm.mean_cosine(reference, embed(student, evals))
            rows.append(Row(f"{label}: activation-aware SVD + distilled {args.epochs:g} ep",
                            metrics={"cosine": setting["cosine_after"], **base}))
            print(f"{rows[-1].name}: cosine {setting['cosine_after']:.4f} ({setting['distill_s']:.0f} s)",
                  file=sys.stderr, flush=True)
        setting["row"] = rows[-1].name
        timed[rows[-1].name] = onnx(student, f"svd_macs{macs:g}")
        results["settings_run"].append(setting)
    if args.rounds > 0:
        results["load_before_timing"] = quiet_cpu(args.max_load, args.wait)
        by_name = {r.name: r for r in rows}
        for r, t in zip(timed, bench_onnx_files([str(p) for p in timed.values()], [1, 32], threads=args.threads,
                                                 rounds=args.rounds)):
            by_name[r].latency_ms, by_name[r].size_bytes = t.latency_ms, t.size_bytes
        results["load_after_timing"] = os.getloadavg()[0]
        base_ms = rows[0].latency_ms
        for s in results["settings_run"]:
            lat = by_name[s["row"]].latency_ms
            s["latency_ms"] = lat
            s["latency_cut"] = {b: 1 - lat[b]["median"] / base_ms[b]["median"] for b in lat}
        results["original_latency_ms"] = base_ms
    results["rows"] = [r.__dict__ for r in rows]
    results["seconds"] = time.perf_counter() - start
    load = (f"; load {results['load_before_timing']:.2f} before timing, {results['load_after_timing']:.2f} after"
            if args.rounds > 0 else "")
    print_table(rows, f"MiniLM-L6 low-rank (activation-aware SVD of the encoder's Linear layers), ONNX Runtime FP32, "
                      f"seq 128, {args.threads} threads, each model in its own process; cosine to the original over "
                      f"{len(evals)} held-out sentences; distillation {args.epochs:g} ep on {len(train_texts)} "
                      f"sentences, seq {args.train_seq}, lr {args.lr:g}; ratios to the original{load}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = write_atomic(args.out, lambda p: Path(p).write_text(json.dumps(results, indent=1, default=float)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
