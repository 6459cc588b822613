"""Weight sharing (k-means) on the real MiniLM-L6, every Linear and the embedding tables, recovered by distillation.

    nice -n 10 python benchmarks/_ws_minilm.py [--epochs 1] [--variants 16/16,28/8] [--distill 28/8] [--out out/bench/ws_minilm.json]

A part of ``benchmarks/weight_sharing.py`` (run by it as a subprocess), runnable alone. Issue 11's target:
a file >= 8x smaller than FP32 at mean cosine >= 0.99, the 30522 x 384 word-embedding table included.

Model: the sentence embedder (mean pooling, L2 norm) of ``examples/minilm.py``. Every Linear (attention,
FFN, the unused pooler) and every nn.Embedding (words: one codebook per row of the table = per channel;
positions; token types) shares 2^``--bits`` values per output channel (``smallify.cluster`` with
``KMeans(bits, scope='channel')``, linear init, Linear layers importance-weighted by the mean square of their
inputs on 128 calibration sentences; embeddings get no importance), with float32 codebooks or codebooks on
the per-channel INT8 grid (``snap='int8'``). Distillation: the shared encoder learns the original's
embeddings (cosine loss) and every layer's hidden states (mean squared error, ``--feature-weight`` per layer)
on ~3,000 other real sentences (``more_sentences`` minus the evaluation set) at sequence ``--train-seq``,
batch 32, AdamW, cosine schedule, ``--lr``: the centroids, biases and LayerNorms learn, the indices stay;
INT8 codebooks are put back on their grid afterwards. Files: ``smallify.save`` (codebooks + entropy-coded
indices), ratios to ``smallify.save`` of the float model. Evaluation: mean cosine similarity to the original's
embeddings over the same 256 held-out sentences at sequence 128 as ``ptq_minilm.py`` and ``prune_minilm.py``.
The saved file is read back with ``smallify.load`` and its embeddings compared to the in-memory model's.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import smallify as sm
from smallify.bench import wide_console
from smallify.cluster import snap_codebooks
from smallify.examples import minilm
from smallify.examples.sentences import more_sentences, sentences
from smallify.measure.machine import cpu_info, cpu_summary
from smallify.pack.container import read_manifest

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_minilm import Packed  # noqa: E402  (ids, mask) stacked in one input, as TrainData holds it


def stack(tokens: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(tokens["input_ids"]), torch.from_numpy(tokens["attention_mask"])], 1)


@torch.no_grad()
def embed(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def parse_variant(text: str) -> tuple[int, int]:
    """'32/8' -> (32 shared values per channel of every Linear, 8 per row of every Embedding)."""
    try:
        k_linear, k_embedding = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"variant {text!r} is not supported; accepted: LINEAR/EMBEDDING values per channel, "
                         "e.g. 16/16 or 28/8") from None
    return k_linear, k_embedding


def share(teacher: torch.nn.Module, k_linear: int, k_embedding: int, calib: torch.Tensor,
          progress: bool) -> torch.nn.Module:
    """Every Linear on ``k_linear`` values per output channel (importance-weighted on ``calib``), then every
    Embedding on ``k_embedding`` per row (no importance: cluster() gives embeddings none); INT8 codebooks."""
    linear = sm.KMeans(clusters=k_linear, scope="channel", snap="int8", skip=("*embeddings*",))
    model = sm.cluster(teacher, linear, data=calib, progress=progress)
    names = list(model.report.shared)
    embedding = sm.KMeans(clusters=k_embedding, scope="channel", snap="int8", skip=("*encoder.layer*", "*pooler*"))
    model = sm.cluster(model, embedding, progress=progress)    # the shared Linear layers are skipped, kept
    model.shared_layers = names + list(model.report.shared)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="16/16,28/8",
                    help="LINEAR/EMBEDDING shared values per channel, comma-separated (INT8 codebooks)")
    ap.add_argument("--distill", default="28/8", help="the variants to distil, comma-separated ('' for none)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=10, help="steps of linear learning-rate warm-up")
    ap.add_argument("--feature-weight", type=float, default=1 / 6)
    ap.add_argument("--train-seq", type=int, default=64)
    ap.add_argument("--max-train", type=int, default=None, help="distil on the first N training sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench/ws_minilm.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = sys.stderr.isatty()
    start = time.perf_counter()
    float_model, tok = minilm.load()
    teacher = Packed(float_model).eval()
    texts = sentences()
    calib = stack(minilm.tokenize(tok, texts[:128], 128))
    evals = stack(minilm.tokenize(tok, texts[128:384], 128))
    train_texts = more_sentences(texts[128:384])[:args.max_train]
    train = stack(minilm.tokenize(tok, train_texts, args.train_seq))
    reference = embed(teacher, evals)
    tmp = Path(tempfile.mkdtemp(prefix="ws_minilm_"))
    results = {"machine": cpu_info(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "train_sentences": len(train_texts), "eval_sentences": len(evals), "rows": []}

    def saved(model, name) -> tuple[Path, int, dict]:
        path = tmp / f"{name}.smallify"
        sm.save(model, path)
        return path, path.stat().st_size, read_manifest(path)["bytes"]

    t0 = time.perf_counter()
    _, fp32_bytes, fp32_parts = saved(teacher, "fp32")
    safetensors = Path(minilm.model_path()) / "model.safetensors"
    rows = results["rows"]
    rows.append({"name": "FP32 (smallify.save)", "bytes": fp32_bytes, "parts": fp32_parts, "cosine": 1.0,
                 "seconds": time.perf_counter() - t0})
    rows.append({"name": "FP32 (HF model.safetensors, reference)", "bytes": safetensors.stat().st_size,
                 "parts": None, "cosine": 1.0, "seconds": 0.0})
    layer_names = [f"m.encoder.encoder.layer.{i}.output" for i in range(len(float_model.encoder.encoder.layer))]
    to_distil = {v for v in args.distill.split(",") if v}
    for variant in [v for v in args.variants.split(",") if v]:
        k_linear, k_embedding = parse_variant(variant)
        label = f"k-means/channel: Linear {k_linear}, Embedding {k_embedding} values"
        t0 = time.perf_counter()
        student = share(teacher, k_linear, k_embedding, calib, progress)
        cluster_s = time.perf_counter() - t0
        _, size, parts = saved(student, f"{k_linear}-{k_embedding}-before")
        rows.append({"name": label, "variant": variant, "distilled": False, "bytes": size, "parts": parts,
                     "cosine": minilm.mean_cosine(reference, embed(student, evals)), "seconds": cluster_s,
                     "shared_layers": student.shared_layers})
        print(f"{label}: cosine {rows[-1]['cosine']:.4f}, {fp32_bytes / size:.2f}x", file=sys.stderr, flush=True)
        if variant not in to_distil:
            continue
        t0 = time.perf_counter()
        student.train()
        sm.distill(student, teacher, sm.TrainData(train, None, batch_size=32),
                   sm.KD(output_loss="cosine", alpha=1.0, features={n: n for n in layer_names},
                         feature_weight=args.feature_weight),
                   sm.TrainConfig(epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup), progress=progress)
        student.eval()
        snap_codebooks(student)          # the INT8 codebooks back on their grid
        distill_s = time.perf_counter() - t0
        path, size, parts = saved(student, f"{k_linear}-{k_embedding}-after")
        ours = embed(student, evals)
        row = {"name": f"{label} + distilled {args.epochs:g} ep", "variant": variant, "distilled": True,
               "bytes": size, "parts": parts, "cosine": minilm.mean_cosine(reference, ours), "seconds": distill_s}
        try:
            loaded = sm.load(path, Packed(minilm.load()[0]))
            row["load_max_abs_diff"] = float(np.abs(embed(loaded, evals) - ours).max())
        except Exception as e:      # reported, not fatal: the table is still worth having
            row["load_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(f"{row['name']}: cosine {row['cosine']:.4f}, {fp32_bytes / size:.2f}x, load "
              f"{row.get('load_max_abs_diff', row.get('load_error'))}", file=sys.stderr, flush=True)
    for r in rows:
        r["ratio"] = fp32_bytes / r["bytes"]
    results["seconds"] = time.perf_counter() - start
    report(results, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {out}")


def report(results: dict, args) -> None:
    from rich.table import Table

    t = Table(title=f"MiniLM-L6 weight sharing (smallify.cluster + smallify.save); cosine to FP32 over "
                    f"{results['eval_sentences']} held-out sentences, seq 128; distillation {args.epochs:g} epoch(s) "
                    f"on {results['train_sentences']} other sentences, seq {args.train_seq}, batch 32, AdamW "
                    f"lr {args.lr:g} cosine, {args.warmup} warm-up steps; {args.threads} thread(s)", caption=cpu_summary())
    for c in ("model", "file bytes", "x vs FP32", "indices", "codebooks", "float", "cosine", "seconds",
              "load max |diff|"):
        t.add_column(c, justify="left" if c == "model" else "right", overflow="fold")
    for r in results["rows"]:
        p = r["parts"] or {}
        t.add_row(r["name"], f"{r['bytes']:,}", f"{r['ratio']:.2f}", *(f"{p[k]:,}" if p else "-" for k in (
            "indices", "codebooks", "float")), f"{r['cosine']:.4f}", f"{r['seconds']:.0f}",
                  f"{r['load_max_abs_diff']:.1e}" if "load_max_abs_diff" in r else r.get("load_error", ""))
    wide_console().print(t)


if __name__ == "__main__":
    main()
