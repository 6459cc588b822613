"""Every corpus model x every method, and the speed of the CNNs' INT8 against FP32 and ONNX Runtime's quantizer.

    python benchmarks/onnx_corpus.py                   # quality table (about 2 minutes)
    python benchmarks/onnx_corpus.py --speed           # + speed table, each model timed in its own process
    python benchmarks/onnx_corpus.py --speed --only-speed --runtime onnxruntime

Quality table: for each model (smallify/examples/onnx_corpus.py: several exporters and opsets, shared weights,
RNNs, a U-Net, transformers, model-zoo classics at opsets 6-9) and each method: ok with the output SQNR and
cosine against the float model (16 random inputs), the file size ratio and the integer kernels in ONNX
Runtime's optimized graph; or the one-line reason it was refused; a crash would be listed as such.

Speed table: FP32, smallify's default INT8 and ONNX Runtime's ``quantize_static`` (QDQ, U8S8, per channel, on
a ``quant_pre_process``-ed model: its recommended CPU setting), each timed in a fresh process (models
alternating, 3 rounds, median of medians), 2 threads, batch 1 and 32, in ONNX Runtime and OpenVINO.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")

from smallify.examples import onnx_corpus as oc  # noqa: E402
from smallify.measure.isolated import bench_isolated  # noqa: E402

SPEED_MODELS = ("mobilenet_v3ish", "mobilenet_se", "resnet18_224")


def cpu_line() -> str:
    try:
        from smallify.measure.machine import cpu_summary   # one helper for every table, where present

        return cpu_summary()
    except ImportError:
        import platform

        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                     platform.processor())
        flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
        isa = [f for f in ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags]
        return f"CPU: {model}; {', '.join(isa) or 'no AMX/VNNI/BF16 flags'}"


def quality(folder: Path) -> list[oc.Outcome]:
    outcomes = []
    for name in oc.BUILDERS:
        if name == "mobilenet_v3ish":
            continue
        model = oc.build(name, folder)
        for method in oc.METHODS:
            o = oc.check(model, method, folder)
            outcomes.append(o)
            print(f"  {name:20s} {method:12s} {o.status}", file=sys.stderr, flush=True)
    return outcomes


def print_quality(outcomes: list[oc.Outcome]) -> None:
    print(f"\n{'model':20s} {'method':12s} {'result':8s} {'SQNR dB':>8s} {'cosine':>8s} {'size':>6s} {'int ops':>7s}  reason / float layers")
    for o in outcomes:
        if o.status == "ok":
            floats = f"{len(o.float_layers)} float: " + "; ".join(o.float_layers)[:80] if o.float_layers else ""
            print(f"{o.model:20s} {o.method:12s} {'ok':8s} {o.sqnr:8.1f} {o.cosine:8.4f} {o.size_ratio:6.3f} "
                  f"{o.integer_kernels:7d}  {floats}")
        else:
            print(f"{o.model:20s} {o.method:12s} {o.status:8s} {'':8s} {'':8s} {'':6s} {'':7s}  {o.message[:160]}")
    crashes = [o for o in outcomes if o.status == "crash"]
    refused = [o for o in outcomes if o.status == "refused"]
    print(f"\n{len(outcomes)} cases: {len(outcomes) - len(crashes) - len(refused)} ok, {len(refused)} refused "
          f"with a reason, {len(crashes)} crashes")


def speed_models(folder: Path) -> dict[str, dict[str, str]]:
    """model -> {fp32, smallify, ort}: the three files to time."""
    import torch

    import smallify as sm
    from ptq_cnn import ort_quantize_static
    from smallify.examples.models import resnet18

    out = {}
    for name in SPEED_MODELS:
        if name == "resnet18_224":
            torch.manual_seed(0)
            path = folder / "resnet18_224.onnx"
            calib = {"input": np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)}
            oc._export(oc._randomize_bn(resnet18(), 0), (torch.from_numpy(calib["input"][:1]),), path, ["input"], 17)
        else:
            m = oc.build(name, folder)
            path, calib = m.path, m.calib
        q = folder / f"{name}.smallify.onnx"
        sm.quantize(str(path), sm.Int8Static(), data=calib, out=str(q), progress=False)
        r = folder / f"{name}.ort.onnx"
        ort_quantize_static(Path(path), r, calib["input"], uint8=True)
        out[name] = {"fp32": str(path), "smallify": str(q), "ort": str(r)}
    return out


def speed(folder: Path, runtimes: list[str], rounds: int, seconds: float) -> None:
    models = speed_models(folder)
    print(f"\nspeed: each model in its own process, {rounds} rounds x {seconds:g} s, 2 threads; {cpu_line()}")
    print(f"{'model':16s} {'runtime':12s} {'batch':>5s} {'FP32 ms':>9s} {'smallify':>9s} {'ORT quant':>9s} "
          f"{'smallify/FP32':>13s} {'smallify/ORT':>12s}")
    for name, files in models.items():
        for runtime in runtimes:
            t = bench_isolated(files, (1, 32), runtime, 2, seconds, rounds,
                               progress=lambda msg: print(f"  {name}: {msg}", file=sys.stderr, flush=True))
            for b in (1, 32):
                f, s, o = t["fp32", b], t["smallify", b], t["ort", b]
                print(f"{name:16s} {runtime:12s} {b:5d} {f:9.2f} {s:9.2f} {o:9.2f} {s / f:13.2f} {s / o:12.2f}",
                      flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed", action="store_true", help="also time the CNNs (separate processes)")
    ap.add_argument("--only-speed", action="store_true")
    ap.add_argument("--runtime", action="append", choices=("onnxruntime", "openvino"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    print(cpu_line())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.only_speed:
            start = time.perf_counter()
            print_quality(quality(folder))
            print(f"quality table: {time.perf_counter() - start:.0f} s")
        if args.speed or args.only_speed:
            speed(folder, args.runtime or ["onnxruntime", "openvino"], args.rounds, args.seconds)


if __name__ == "__main__":
    main()
