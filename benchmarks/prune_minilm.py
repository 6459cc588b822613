"""Attention-head and FFN-neuron pruning of the real MiniLM-L6, recovered by distillation on real sentences.

    python benchmarks/prune_minilm.py [--head-ratio 0.34] [--ffn-ratio 0.34] [--epochs 3] [--budget 10]

Importance: activation x weight norm on 128 calibration sentences. Distillation: the pruned encoder learns
the original's embeddings (cosine loss) and, unless ``--no-features``, every layer's hidden states (mean
squared error, ``--feature-weight`` per layer) on ~3,000 other real sentences (every docstring sentence of the
stdlib modules in ``examples/sentences.py`` that is not in the evaluation set), AdamW, cosine schedule.
Evaluation: mean cosine similarity to the original's embeddings over the same 256 sentences as
``ptq_minilm.py``; ONNX Runtime FP32 latency at sequence 128, batch 1 and 32, interleaved, 2 threads.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import smallify as sm
from smallify.bench import Row, print_table
from smallify.examples import minilm
from smallify.examples.sentences import more_sentences, sentences
from smallify.measure import bench_interleaved, count_params, file_size, ort_runner

warnings.filterwarnings("ignore")
NAMES = ["input_ids", "attention_mask"]


class Packed(torch.nn.Module):
    """(ids, mask) stacked in one tensor, as TrainData holds it."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x[:, 0], x[:, 1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-ratio", type=float, default=0.34)
    ap.add_argument("--ffn-ratio", type=float, default=0.34)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--no-features", action="store_true", help="distil the embeddings only")
    ap.add_argument("--feature-weight", type=float, default=1 / 6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-seq", type=int, default=64)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, tok = minilm.load()
    texts = sentences()
    calib = minilm.tokenize(tok, texts[:128], 128)
    evals = minilm.tokenize(tok, texts[128:384], 128)
    train_texts = more_sentences(texts[128:384])
    train = minilm.tokenize(tok, train_texts, args.train_seq)

    def embed(model, data):
        with torch.no_grad():
            return torch.cat([model(torch.from_numpy(data["input_ids"][i:i + 64]),
                                    torch.from_numpy(data["attention_mask"][i:i + 64]))
                              for i in range(0, len(data["input_ids"]), 64)]).numpy()

    reference = embed(teacher, evals)
    calib_batches = [(torch.from_numpy(calib["input_ids"][i:i + 16]), torch.from_numpy(calib["attention_mask"][i:i + 16]))
                     for i in range(0, 128, 16)]
    t0 = time.perf_counter()
    student = sm.prune_attention(teacher, sm.AttentionPrune(args.head_ratio, args.ffn_ratio), calib_batches)
    prune_s = time.perf_counter() - t0
    cos_pruned = minilm.mean_cosine(reference, embed(student, evals))
    layers = student.prune_report["layers"]
    print(f"pruned: heads {layers[0]['heads']}, FFN {layers[0]['ffn']} per layer; cosine before distillation "
          f"{cos_pruned:.4f}", file=sys.stderr, flush=True)
    x = torch.stack([torch.from_numpy(train["input_ids"]), torch.from_numpy(train["attention_mask"])], 1)
    t0 = time.perf_counter()
    layer_names = [f"m.encoder.encoder.layer.{i}.output" for i in range(len(student.encoder.encoder.layer))]
    features = {} if args.no_features else {n: n for n in layer_names}
    sm.distill(Packed(student), Packed(teacher), sm.TrainData(x, None, batch_size=32),
               sm.KD(output_loss="cosine", alpha=1.0, features=features, feature_weight=args.feature_weight),
               sm.TrainConfig(epochs=args.epochs, lr=args.lr), progress=sys.stderr.isatty())
    kd_s = time.perf_counter() - t0
    student.eval()
    rows, runners = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, extra in [("MiniLM-L6 (original)", teacher, {}),
                                   (f"pruned {layers[0]['heads'][1]}/12 heads, {layers[0]['ffn'][1]}/1536 FFN, "
                                    f"no distillation", None, {"cosine": cos_pruned}),
                                   (f"pruned + distilled {args.epochs:g} ep on {len(train_texts)} sentences"
                                    + ("" if args.no_features else " (+ hidden states)"), student,
                                    {"prune_s": prune_s, "distill_s": kd_s})]:
            if model is None:
                rows.append(Row(name, metrics=extra))
                continue
            path = Path(tmp) / f"{len(rows)}.onnx"
            sm.export_onnx(model, path, tuple(torch.from_numpy(calib[k][:2]) for k in NAMES), input_names=NAMES)
            runners[name] = ort_runner(path, args.threads)[0]
            metrics = {"cosine": minilm.mean_cosine(reference, embed(model, evals)),
                       "params (M)": count_params(model) / 1e6, **extra}
            rows.append(Row(name, file_size(path), metrics=metrics))
        for b in (1, 32):
            feed = {k: evals[k][:b] for k in NAMES}
            stats = bench_interleaved(runners, {n: feed for n in runners}, budget_s=args.budget)
            for r in rows:
                if r.name in stats:
                    r.latency_ms[b] = {"median": stats[r.name].median_ms, "p90": stats[r.name].p90_ms}
    print_table(rows, f"MiniLM-L6 head/FFN pruning, ONNX Runtime FP32, seq 128, {args.threads} threads; cosine to the "
                      "original over 256 held-out sentences; ratios to the original")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=float))


if __name__ == "__main__":
    main()
