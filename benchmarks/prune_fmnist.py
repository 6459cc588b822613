"""Pruning and distillation on the bundled Fashion-MNIST ResNet, smallify against Torch-Pruning, one run.

    python benchmarks/prune_fmnist.py [--epochs 5] [--only channel|sparse|kd]

channel: smallify's plan: ``--branches`` residual branches removed whole (the least output error per MAC
         saved, on 512 training images), then ``--ratio`` of each channel group's channels with ``--layer-ratio``
         overrides (L2 filter norms + least-squares reconstruction), kept counts rounded to ``--round-to``.
         The peers' plan (Torch-Pruning cannot remove branches): ``--peer-ratio`` / ``--peer-layer-ratio`` of the
         channels, run by Torch-Pruning (MetaPruner, L2 magnitude, the classifier kept) and by smallify.
         Then the same recovery for every pruned model: ``--epochs`` of knowledge distillation from the
         unpruned model (soft labels, T = 4, alpha = 0.9, plus each stage's output matched with weight
         ``--feature-weight``; AdamW, cosine). Top-1 on the 10,000 test images, MACs, parameters, ONNX Runtime latency
         at batch 1 and 32 (one interleaved loop, ratios to the unpruned model).
sparse:  90% unstructured magnitude sparsity reached with the cubic schedule during ``--sparse-epochs`` of
         fine-tuning with distillation from the dense model; top-1 and the .smallify file size.
kd:      a half-width student trained ``--kd-epochs`` from scratch on labels alone and with distillation from
         the bundled model (same data, same schedule).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
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
from smallify.distill import kd_loss as kd_loss_fn
from smallify.examples import fashion_mnist
from smallify.examples.demo import pretrained_fmnist_resnet
from smallify.examples.models import ResNet
from smallify.examples.train_fmnist import augment
from smallify.measure import bench_interleaved, count_macs, count_params, file_size, ort_runner

warnings.filterwarnings("ignore")


def torch_pruning(model, example, ratio: float, round_to: int, layer_ratios: dict):
    import fnmatch

    import torch_pruning as tp

    model = copy.deepcopy(model)
    per_module = {m: r for name, m in model.named_modules() for pat, r in layer_ratios.items()
                  if isinstance(m, torch.nn.Conv2d) and fnmatch.fnmatchcase(name, pat)}
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, pruning_ratio_dict=per_module or None,
                                  round_to=round_to if round_to > 1 else None, ignored_layers=[model.fc])
    pruner.step()
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=5.0)
    ap.add_argument("--kd-epochs", type=float, default=3.0)
    ap.add_argument("--branches", type=int, default=2, help="smallify's plan: residual branches removed whole")
    ap.add_argument("--ratio", type=float, default=0.0, help="smallify's plan: fraction of each group's channels")
    ap.add_argument("--layer-ratio", action="append", default=None,
                    help="smallify's plan: pattern=ratio, repeatable (default: layers.1.*.conv1=0.5 and "
                    "layers.2.*.conv1=0.5, the blocks' inner widths); 'none' for none")
    ap.add_argument("--peer-ratio", type=float, default=0.5, help="the channel-only plan both tools run")
    ap.add_argument("--peer-layer-ratio", action="append", default=None,
                    help="the channel-only plan: pattern=ratio, repeatable (default: layers.2.*=0.75)")
    ap.add_argument("--round-to", type=int, default=16, help="kept channel counts: multiples of this (ONNX Runtime's "
                    "x86 convolution kernels work on blocks of 16 channels)")
    ap.add_argument("--sparse-epochs", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--feature-weight", type=float, default=0.0, help="recovery also matches each stage's output "
                    "to the unpruned model's (MSE, through a 1x1 projection where widths differ); 0: logits only")
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", action="append", choices=["channel", "sparse", "kd"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    parts = args.only or ["channel", "sparse", "kd"]

    def ratios(items, default):
        return {k: float(v) for k, v in (i.split("=") for i in (items or default) if i != "none")}

    layer_ratios = ratios(args.layer_ratio, ["layers.1.*.conv1=0.5", "layers.2.*.conv1=0.5"])
    peer_ratios = ratios(args.peer_layer_ratio, ["layers.2.*=0.75"])
    torch.set_num_threads(args.threads)
    teacher = pretrained_fmnist_resnet()
    xtr, ytr = fashion_mnist.load("train")
    xte, yte = fashion_mnist.load("test")
    xtr, xte = torch.from_numpy(fashion_mnist.normalize(xtr)), torch.from_numpy(fashion_mnist.normalize(xte))
    ytr, yte = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
    data = sm.TrainData(xtr, ytr, batch_size=128, augment=augment)
    example = xte[:2]
    progress = sys.stderr.isatty()
    tmp = Path(tempfile.mkdtemp(prefix="prune_fmnist_"))
    out = {}

    @torch.no_grad()
    def acc(m) -> float:
        m.eval()
        return float(sum(int((m(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum()) for i in range(0, 10000, 1000))) / 10000

    def stage_outputs(m) -> list[str]:
        """The ReLU that ends each stage (the last block left in it; it runs last in its block)."""
        names = dict(m.named_modules())
        return [max((n for n in names if n.startswith(f"layers.{i}.") and n.endswith(".relu")),
                    key=lambda n: int(n.split(".")[2])) for i in range(3)]

    def recover(m):
        if args.epochs == 0:          # --epochs 0: the pruned architectures as they are (latency, sizes)
            return m
        features = dict(zip(stage_outputs(m), stage_outputs(teacher))) if args.feature_weight > 0 else {}
        return sm.distill(m, teacher, data, sm.KD(temperature=4.0, alpha=0.9, features=features,
                                                  feature_weight=args.feature_weight),
                          sm.TrainConfig(epochs=args.epochs, lr=args.lr), progress=progress)

    if "channel" in parts:
        rows, runners = [], {}

        def add(name, m, **metrics):
            path = tmp / f"{len(rows)}.onnx"
            sm.export_onnx(m, path, example[:1])
            runners[name] = ort_runner(path, args.threads)[0]
            rows.append(Row(name, file_size(path), metrics={"top1": acc(m), "MACs (M)": count_macs(m, example) / 1e6,
                                                           "params (k)": count_params(m) / 1e3, **metrics}))
            print(f"{name}: {rows[-1].metrics}", file=sys.stderr, flush=True)

        add("unpruned", teacher)

        def widths(m) -> str:
            outer = "/".join(str(m.get_submodule(f"layers.{i}.0.conv2").out_channels) for i in range(3))
            inner = "/".join(str(m.get_submodule(f"layers.{i}.0.conv1").out_channels) for i in range(3))
            gone = len(getattr(getattr(m, "prune_report", None), "branches", []))
            return outer + (f" (inner {inner})" if inner != outer else "") + (f" - {gone} blocks" if gone else "")

        def ours(config, label):
            t0 = time.perf_counter()
            m = sm.prune(teacher, config, example, data=xtr[:512])
            prune_s = time.perf_counter() - t0
            before_ft = acc(m)
            plain = acc(sm.prune(teacher, dataclasses.replace(config, reconstruct=False), example, data=xtr[:512]))
            print(m.prune_report, file=sys.stderr)
            t0 = time.perf_counter()
            recover(m)
            add(f"{label} {widths(m)} + KD {args.epochs:g} ep", m, top1_before_ft=before_ft, top1_no_reconstruct=plain,
                prune_s=prune_s, finetune_s=time.perf_counter() - t0)

        ours(sm.ChannelPrune(ratio=args.ratio, importance="l2", reconstruct=True, round_to=args.round_to,
                             layer_ratios=layer_ratios, branches=args.branches), "smallify")
        ours(sm.ChannelPrune(ratio=args.peer_ratio, importance="l2", reconstruct=True, round_to=args.round_to,
                             layer_ratios=peer_ratios), "smallify, channels only,")
        try:
            t0 = time.perf_counter()
            theirs = torch_pruning(teacher, example, args.peer_ratio, args.round_to, peer_ratios)
            t_theirs = time.perf_counter() - t0
            before_ft = acc(theirs)
            t0 = time.perf_counter()
            recover(theirs)
            add(f"Torch-Pruning {widths(theirs)} + KD {args.epochs:g} ep", theirs, top1_before_ft=before_ft,
                prune_s=t_theirs, finetune_s=time.perf_counter() - t0)
        except ImportError:
            print("torch-pruning is not installed (pip install torch-pruning)", file=sys.stderr)
        for b in (1, 32):
            feed = {"input": xte[:b].numpy()}
            stats = bench_interleaved(runners, {n: feed for n in runners}, budget_s=args.budget)
            for r in rows:
                r.latency_ms[b] = {"median": stats[r.name].median_ms, "p90": stats[r.name].p90_ms}
        print_table(rows, f"channel pruning, Fashion-MNIST ResNet, ONNX Runtime {args.threads} threads; ratios to unpruned")
        out["channel"] = [r.__dict__ for r in rows]

    if "sparse" in parts:
        rows = []
        sm.save(teacher, tmp / "dense.smallify")
        rows.append(Row("dense FP32", file_size(tmp / "dense.smallify"), metrics={"top1": acc(teacher)}))
        t0 = time.perf_counter()
        def sparse_loss(out, y, x):      # distillation from the dense model while the sparsity ramps
            with torch.no_grad():
                t = teacher(x)
            return 0.9 * kd_loss_fn(out, t, 4.0) + 0.1 * torch.nn.functional.cross_entropy(out, y)

        sparse = sm.prune_gradually(teacher, data, sm.Unstructured(sparsity=0.9),
                                    sm.TrainConfig(epochs=args.sparse_epochs, lr=args.lr), loss_fn=sparse_loss,
                                    progress=progress)
        sm.save(sparse, tmp / "sparse.smallify")
        rows.append(Row(f"90% unstructured, gradual + KD over {args.sparse_epochs:g} ep", file_size(tmp / "sparse.smallify"),
                        metrics={"top1": acc(sparse), "sparsity": sm.sparsity_of(sparse),
                                 "finetune_s": time.perf_counter() - t0}))
        print_table(rows, "unstructured magnitude pruning (cubic schedule); size: the .smallify file")
        out["sparse"] = [r.__dict__ for r in rows]

    if "kd" in parts:
        rows = []
        for use_kd in (False, True):
            torch.manual_seed(0)
            student = ResNet((2, 2, 2), (8, 16, 32), 1, 10, "small")
            cfg = sm.TrainConfig(epochs=args.kd_epochs, lr=1e-2, optimizer="adamw")
            t0 = time.perf_counter()
            if use_kd:
                sm.distill(student, teacher, data, sm.KD(temperature=4.0, alpha=0.9), cfg, progress=progress)
            else:
                sm.train(student, data, cfg, progress=progress)
            rows.append(Row(f"student (widths 8/16/32), {'KD from the bundled model' if use_kd else 'labels only'}",
                            metrics={"top1": acc(student), "params (k)": count_params(student) / 1e3,
                                     "train_s": time.perf_counter() - t0}))
            print(f"{rows[-1].name}: {rows[-1].metrics}", file=sys.stderr, flush=True)
        rows.insert(0, Row("teacher (bundled, widths 16/32/64)", metrics={"top1": acc(teacher),
                                                                          "params (k)": count_params(teacher) / 1e3}))
        print_table(rows, f"distillation alone: the same student, {args.kd_epochs:g} epochs, same data and schedule")
        out["kd"] = [r.__dict__ for r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
