"""HashedNets against the dense network of the same stored size (Chen et al., 2015, Table 1's comparison).

    nice -n 10 python benchmarks/hashednets.py          # ~6 min on one thread (5 min 42 s on a shared AMD EPYC)

Fashion-MNIST (the 60,000 training images, top-1 on the 10,000 test images), an MLP 784-H-10 with ReLU
(H = ``--hidden``, 1000 by default) trained from scratch with ``smallify.train`` (AdamW, ``--lr``, cosine,
``--epochs``, batch 128, the same seed and batch order for every row). Rows: the dense 784-H-10; for each
``--compressions`` c, the hashed 784-H-10 (``hash_share(HashShare(compression=c))``: K = c x the weights of
each layer, buckets initialised at random in ±1/sqrt(fan_in) as the float layer's init) and the dense
784-h-10 whose stored parameter count (weights + biases) is the nearest to the hashed net's (buckets +
biases). The paper reports the hashed net ahead of the equal-size dense net, by more as c shrinks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

import smallify as sm
from smallify import files
from smallify.cluster.hashing import HashedTwin, HashShare, hash_share
from smallify.examples import fashion_mnist
from smallify.measure.machine import cpu_info, cpu_summary


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def stored(model: nn.Module) -> int:
    return sum(p.numel() for p in model.state_dict().values())


def equal_width(params: int) -> int:
    """The hidden width h whose 784-h-10 MLP (795 h + 10 parameters) is nearest to ``params``."""
    return max(1, round((params - 10) / 795))


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum()) for i in range(0, len(x), 2000))
    return hits / len(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1000)
    ap.add_argument("--compressions", nargs="+", default=["1/8", "1/32", "1/64"])
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="out/bench/hashednets.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    files.check_writable(out)
    xtr, ytr = fashion_mnist.load("train")
    xte, yte = fashion_mnist.load("test")
    xtr = torch.from_numpy(fashion_mnist.normalize(xtr)).flatten(1)
    xte = torch.from_numpy(fashion_mnist.normalize(xte)).flatten(1)
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    data = sm.TrainData(xtr, ytr, batch_size=128, seed=0)
    rows = []

    def run(name: str, model: nn.Module, hidden: int, compression: str | None) -> None:
        t0 = time.perf_counter()
        sm.train(model, data, sm.TrainConfig(epochs=args.epochs, lr=args.lr, seed=0), progress=sys.stderr.isatty())
        row = {"model": name, "hidden": hidden, "compression": compression, "stored_params": stored(model),
               "top1": top1(model, xte, yte), "train_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name}: {row['stored_params']} params, top-1 {row['top1']:.4f} ({row['train_s']:.0f} s)",
              file=sys.stderr, flush=True)

    torch.manual_seed(0)
    run(f"dense 784-{args.hidden}-10", mlp(args.hidden), args.hidden, None)
    for c in args.compressions:
        frac = float(Fraction(c))
        torch.manual_seed(0)
        hashed = hash_share(mlp(args.hidden), HashShare(compression=frac, seed=0), inplace=True)
        with torch.no_grad():          # the paper trains from scratch: the float layer's init, not a projection
            for m in hashed.modules():
                if isinstance(m, HashedTwin):
                    bound = 1 / math.sqrt(m.weight_shape[1])
                    m.buckets.uniform_(-bound, bound)
        run(f"hashed 784-{args.hidden}-10, {c}", hashed, args.hidden, c)
        h = equal_width(rows[-1]["stored_params"])
        torch.manual_seed(0)
        run(f"dense 784-{h}-10 (equal size to {c})", mlp(h), h, c)

    full = rows[0]["stored_params"]
    head = f"{'model':<36} {'stored params':>13} {'x dense':>8} {'top-1':>7} {'train s':>8}"
    print(f"\nFashion-MNIST MLP, {args.epochs:g} epochs AdamW lr {args.lr:g}, top-1 on 10,000 test images")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<36} {r['stored_params']:>13,} {r['stored_params'] / full:>8.4f} "
              f"{100 * r['top1']:>6.2f}% {r['train_s']:>8.0f}")
    print(cpu_summary() + f"; {args.threads} thread(s)")
    result = {"benchmark": "hashednets", "epochs": args.epochs, "lr": args.lr, "hidden": args.hidden,
              "threads": args.threads, "cpu": cpu_info(), "rows": rows}
    files.write_atomic(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
