"""Low-rank decomposition: the bundled Fashion-MNIST ResNet, ResNet-18 at 224x224, MiniLM-L6, and the peers.

    python benchmarks/low_rank.py [--parts fmnist,methods,peers,resnet18,minilm] [--macs 0.5,0.35] [--epochs 2]
        [--out out/bench/low_rank.json] [--redo]

fmnist:   ``smallify.decompose(model, LowRank(macs=M), data=256 training images)`` for each ``--macs`` (the kept share of
          the model's MACs, spread over the layers by least output error per saved MAC; svd for 1x1 and Linear,
          spatial or Tucker-2 for 3x3, whichever is cheaper at the error; every chosen layer timed against the
          original in ONNX Runtime at batch 1 and kept only where faster), then ``--epochs`` of distillation from
          the original (KD, T = 4, alpha = 0.9, AdamW, cosine, lr ``--lr``). Then the same model INT8
          (``Int8Static`` on 512 calibration images) against the original INT8. Top-1 on the 10,000 test images;
          ONNX bytes; ONNX Runtime latency at batch 1 and 32, 2 threads, each model timed in its own process (3
          rounds, alternating). The trained models are kept next to ``--out`` (a re-run only re-times them).
methods:  every method at one matched budget (``--methods-macs`` of the model's MACs), before and after
          ``--methods-epochs`` of distillation: spatial, tucker, separable (least-squares fit on the data),
          auto. Top-1, MACs, latency as above.
peers:    tensorly's Tucker (``partial_tucker``) at the same ranks as smallify's Tucker-2 (half the channels each
          way), and CP (``parafac``, the 4-way CP of Lebedev et al.) at the spatial form's rank (2C: about half the
          layer's MACs) and at the CP rank with the same MACs, on the same 3x3 layers, before fine-tuning:
          relative weight error, and the spatial form's output error on the data; then plain SVD against activation-aware SVD
          at the same ranks (the Linear classifier and 1x1 shortcut convolutions, and every 3x3 conv by the
          spatial form with and without the least-squares refit).
resnet18: ResNet-18 at 224x224 with random weights (speed only; weight-space fits): spatial, tucker and separable at
          ``--resnet-macs`` of the MACs (no speed check: every 3x3 conv but the stem decomposed) and ``auto`` with
          the ONNX Runtime speed check, in ONNX Runtime and OpenVINO at batch 1, each model in its own process.
minilm:   benchmarks/_lr_minilm.py (activation-aware SVD of MiniLM-L6, distilled on real sentences), a subprocess.
"""
from __future__ import annotations

import argparse
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
from smallify.bench import Row, bench_onnx_files, print_table
from smallify.distill import kd_loss
from smallify.examples import fashion_mnist
from smallify.examples.demo import calibration_images, pretrained_fmnist_resnet
from smallify.examples.models import fmnist_resnet, resnet18
from smallify.examples.train_fmnist import augment
from smallify.lowrank import LowRank, decompose
from smallify.lowrank.decompose import input_stats
from smallify.measure.machine import cpu_summary

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
PARTS = ("fmnist", "methods", "peers", "resnet18", "minilm")


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
        self.fit_data = self.xtr[torch.randperm(len(self.xtr), generator=torch.Generator().manual_seed(0))[:256]]
        self.calib = torch.from_numpy(calibration_images(512))
        self.tmp = Path(tempfile.mkdtemp(prefix="low_rank_"))
        self.keep = Path(args.out).with_suffix("")       # trained models: <out>.<name>.smallify
        self.progress = sys.stderr.isatty()
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

    def finetune(self, m, epochs: float):
        if epochs > 0:
            sm.train(m, self.data, sm.TrainConfig(epochs=epochs, lr=self.args.lr), loss_fn=self.kd,
                     progress=self.progress)
        return m.eval()

    def trained(self, name: str, make, epochs: float):
        """(the decomposed model fine-tuned ``epochs``, top-1 before fine-tuning, report): from ``--out``'s
        folder when a previous run kept it, else made and kept (so that a re-run only re-times)."""
        path = Path(f"{self.keep}.{name}.smallify")
        meta = path.with_suffix(".json")
        if path.is_file() and meta.is_file() and not self.args.redo:
            info = json.loads(meta.read_text())
            return sm.load(path, fmnist_resnet()), info["top1_before"], info["report"]
        t0 = time.perf_counter()
        m = make()
        before = self.top1(m)
        report = m.report.to_dict()
        print(f"  {name}: top-1 {before:.4f} before fine-tuning; MACs x{report['macs_after'] / report['macs_before']:.3f}",
              flush=True)
        m = self.finetune(m, epochs)
        path.parent.mkdir(parents=True, exist_ok=True)
        sm.save(m, path)
        back = sm.load(path, fmnist_resnet())
        with torch.no_grad():
            assert torch.equal(back(self.xte[:64]), m(self.xte[:64])), "save -> load changed the output"
        meta.write_text(json.dumps({"top1_before": before, "report": report, "seconds": time.perf_counter() - t0}))
        return m, before, report

    def onnx(self, m, name: str) -> Path:
        path = self.tmp / f"{name}.onnx"
        sm.export_onnx(m, path, self.xte[:1])
        return path


def timed_rows(b: Bench, models: dict[str, tuple], batches=(1, 32)) -> list[Row]:
    """models: name -> (onnx path, metrics); every model in its own process, 3 rounds, ratios to the first."""
    names = list(models)
    rows = bench_onnx_files([str(models[n][0]) for n in names], list(batches), threads=b.args.threads, rounds=3)
    for r, n in zip(rows, names):
        r.name, r.metrics = n, models[n][1]
    return rows


def metrics(b: Bench, m, before: float | None, report: dict | None) -> dict:
    top1 = b.top1(m)
    out = {"top1": top1, "drop_pts": 100 * (b.fp32_top1 - top1)}
    if before is not None:
        out["top1_before_ft"] = before
    if report:
        out["macs_x"] = report["macs_after"] / report["macs_before"]
        out["params_x"] = report["params_after"] / report["params_before"]
    return out


def fmnist(b: Bench) -> dict:
    models = {"FP32 original": (b.onnx(b.teacher, "orig"), metrics(b, b.teacher, None, None))}
    int8 = {}
    q = sm.quantize(b.teacher, sm.Int8Static(), data=b.calib, progress=False)
    int8["INT8 original"] = (b.onnx(q, "orig_int8"), metrics(b, q, None, None))
    layers = {}
    for macs in b.args.macs:
        name = f"decomposed macs={macs:g}"
        m, before, report = b.trained(f"fmnist_macs{macs:g}", lambda: decompose(
            b.teacher, LowRank(macs=macs), data=b.fit_data, progress=b.progress), b.args.epochs)
        layers[name] = report["layers"]
        models[f"{name} + {b.args.epochs:g} ep KD"] = (b.onnx(m, f"d{macs}"), metrics(b, m, before, report))
        q = sm.quantize(m, sm.Int8Static(), data=b.calib, progress=False)
        int8[f"INT8 of {name}"] = (b.onnx(q, f"d{macs}_int8"), metrics(b, q, None, report))
    rows = timed_rows(b, {**models, **int8})
    print_table(rows, "Fashion-MNIST ResNet, low-rank + distillation, FP32 then INT8, ONNX Runtime 2 threads "
                      "(ratios to the FP32 original)")
    return {"rows": [row_dict(r) for r in rows], "layers": layers}


def row_dict(r: Row) -> dict:
    return {"name": r.name, "bytes": r.size_bytes, "latency_ms": r.latency_ms, **r.metrics}


def methods(b: Bench) -> dict:
    budget = b.args.methods_macs
    models = {"FP32 original": (b.onnx(b.teacher, "orig"), metrics(b, b.teacher, None, None))}
    for method in ("spatial", "tucker", "separable", "auto"):
        cfg = LowRank(method=method, macs=budget, runtime=None)
        try:
            m, before, report = b.trained(f"method_{method}_{budget:g}", lambda: decompose(
                b.teacher, cfg, data=b.fit_data, progress=b.progress), b.args.methods_epochs)
        except sm.ConfigError as e:
            print(f"  {method}: {e}")
            continue
        models[f"{method} macs={budget:g} + {b.args.methods_epochs:g} ep KD"] = (
            b.onnx(m, f"m_{method}"), metrics(b, m, before, report))
    rows = timed_rows(b, models)
    print_table(rows, f"Fashion-MNIST ResNet, every method at {budget:g} of the MACs (no speed check), ONNX Runtime")
    return {"rows": [row_dict(r) for r in rows]}


def _output_error(conv, parts, x) -> float:
    with torch.no_grad():
        ref = conv(x) - (conv.bias.reshape(1, -1, 1, 1) if conv.bias is not None else 0)
        out = parts(x)
        if conv.bias is not None:
            out = out - conv.bias.reshape(1, -1, 1, 1)
        return float((out - ref).pow(2).sum() / ref.pow(2).sum())


def peers(b: Bench) -> dict:
    """tensorly's Tucker and CP against smallify's forms on the same layers at the same ranks (no fine-tuning);
    plain against activation-aware SVD."""
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker

    from smallify.lowrank import factor as fa
    from smallify.lowrank.modules import build
    from smallify.quant.weight_only import fold_batchnorm

    tl.set_backend("pytorch")
    model = fold_batchnorm(b.teacher)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
             and m.in_channels > 1}
    inputs = {}
    def keep(name):
        def hook(mod, args, out):       # returns None: the layer's output is left alone
            inputs.setdefault(name, args[0].detach())
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in convs.items()]
    with torch.no_grad():
        model(b.fit_data)
    for h in handles:
        h.remove()
    stats = input_stats(model, convs, b.fit_data)[1]
    rows = []
    for name, conv in convs.items():
        W4 = conv.weight.detach().double()
        O, C = W4.shape[:2]
        x = inputs[name]
        r_out, r_in = O // 2, C // 2
        ours = fa.tucker_factors(W4, r_out, r_in, sweeps=50)
        core, factors = partial_tucker(tl.tensor(W4), rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=100)[0]
        theirs = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
        rec = {"layer": name, "shape": list(W4.shape), "tucker_ranks": [r_out, r_in],
               "tucker_err_smallify": fa.relative_error(W4.reshape(O, -1), ours.composite()),
               "tucker_err_tensorly": fa.relative_error(W4.reshape(O, -1), theirs.reshape(O, -1)),
               "tucker_out_err_smallify": _output_error(conv, build(conv, ours), x)}
        rank = 2 * C       # the spatial form at about half the layer's MACs
        # CP-4 (Lebedev et al.: 1x1 C->R, kx1 and 1xk depthwise, 1x1 R->O) at the same MACs per pixel
        cp_rank = round(rank * 3 * (C + O) / (C + O + 6))
        sp = fa.SpatialFit(W4).at(rank)
        cp_errors = {}
        for r in (rank, cp_rank):
            cp_w = tl.cp_to_tensor(parafac(tl.tensor(W4), rank=r, init="svd", n_iter_max=200, tol=1e-8))
            cp_errors[r] = fa.relative_error(W4.reshape(O, -1), cp_w.reshape(O, -1))
        S = stats[name]
        refit = fa.with_last(sp, fa.refit_last(W4.reshape(O, -1), sp.K, S))
        rec.update({"spatial_rank": rank, "cp_rank": cp_rank,
                    "spatial_err_smallify": fa.relative_error(W4.reshape(O, -1), sp.composite()),
                    "cp_err_tensorly_same_rank": cp_errors[rank], "cp_err_tensorly_same_macs": cp_errors[cp_rank],
                    "spatial_out_err_plain": _output_error(conv, build(conv, sp), x),
                    "spatial_out_err_refit": _output_error(conv, build(conv, refit), x)})
        rows.append(rec)
        print(f"  {name}: tucker {rec['tucker_err_smallify']:.4f} vs tensorly {rec['tucker_err_tensorly']:.4f}; "
              f"spatial r{rank} {rec['spatial_err_smallify']:.4f} vs CP r{rank} {cp_errors[rank]:.4f} (r{cp_rank}, the "
              f"same MACs: {cp_errors[cp_rank]:.4f}); "
              f"output error spatial {rec['spatial_out_err_plain']:.4f} -> refit {rec['spatial_out_err_refit']:.4f}",
              flush=True)
    svd_rows = []
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or
              (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))}
    moments = input_stats(model, linear, b.fit_data)[1]
    for name, layer in linear.items():
        W = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
        r = max(1, min(W.shape) // 4)
        plain, aware = fa.SVDFit(W), fa.SVDFit(W, moments[name])
        S = moments[name]
        svd_rows.append({"layer": name, "shape": list(W.shape), "rank": r,
                         "out_err_plain": fa.relative_error(W, torch.mm(*plain.at(r)), S),
                         "out_err_activation_aware": fa.relative_error(W, torch.mm(*aware.at(r)), S)})
        print(f"  {name} rank {r}: output error plain SVD {svd_rows[-1]['out_err_plain']:.4f}, activation-aware "
              f"{svd_rows[-1]['out_err_activation_aware']:.4f}", flush=True)
    whole = {}
    for label, aware in (("weight-space (plain SVD, no refit)", False), ("activation-aware", True)):
        m = decompose(b.teacher, LowRank(macs=b.args.methods_macs, runtime=None, aware=aware), data=b.fit_data,
                      progress=False)
        whole[label] = b.top1(m)
        print(f"  whole model at {b.args.methods_macs:g} of the MACs, {label}: top-1 {whole[label]:.4f} before "
              "fine-tuning", flush=True)
    return {"conv": rows, "svd": svd_rows, "whole_model_top1": whole}


def resnet(b: Bench) -> dict:
    torch.manual_seed(0)
    net = resnet18().eval()
    with torch.no_grad():      # random but not degenerate BatchNorms
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 224, 224)
    budget = b.args.resnet_macs
    paths = {"FP32 ResNet-18": b.tmp / "r18.onnx"}
    sm.export_onnx(net, paths["FP32 ResNet-18"], x[:1])
    info = {"FP32 ResNet-18": {"macs_x": 1.0}}
    for method in ("spatial", "tucker", "separable", "auto"):
        cfg = LowRank(method=method, macs=budget, runtime="onnxruntime" if method == "auto" else None,
                      skip=("stem.*",), round_to=16, aware=False)     # random weights: weight-space fits
        try:
            d = decompose(net, cfg, data=x, progress=b.progress)
        except sm.ConfigError as e:
            print(f"  {method}: {e}")
            continue
        label = f"{method} macs={budget:g}" + (" + ORT speed check" if method == "auto" else "")
        paths[label] = b.tmp / f"r18_{method}.onnx"
        sm.export_onnx(d, paths[label], x[:1])
        rep = d.report
        info[label] = {"macs_x": rep.macs_after / rep.macs_before, "decomposed": len(rep.decomposed),
                       "kept_slower": sum("not faster" in l.reason for l in rep.layers)}
        print(f"  {label}: MACs x{info[label]['macs_x']:.3f}, {len(rep.decomposed)} layers decomposed", flush=True)
    out = {}
    for runtime in ("onnxruntime", "openvino"):
        rows = bench_onnx_files([str(p) for p in paths.values()], [1], threads=b.args.threads, rounds=3,
                                runtimes=(runtime,))
        for r, n in zip(rows, paths):
            r.name, r.metrics = n, info[n]
        print_table(rows, f"ResNet-18 224x224 (random weights), {runtime}, batch 1, 2 threads")
        out[runtime] = [row_dict(r) for r in rows]
    return out


def subprocess_part(script: str, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / script), "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--macs", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 0.35])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--methods-macs", type=float, default=0.5)
    ap.add_argument("--methods-epochs", type=float, default=1.0)
    ap.add_argument("--resnet-macs", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench/low_rank.json")
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
        t0 = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "minilm":
            results[part] = subprocess_part("_lr_minilm.py", out.with_name("lr_minilm.json"))
        else:
            bench = bench or Bench(args)
            results["fp32_top1"] = bench.fp32_top1
            results[part] = {"fmnist": fmnist, "methods": methods, "peers": peers, "resnet18": resnet}[part](bench)
        results[part]["seconds"] = time.perf_counter() - t0
        results[part]["settings"] = {k: v for k, v in vars(args).items() if k not in ("parts", "redo", "out")}
        out.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
