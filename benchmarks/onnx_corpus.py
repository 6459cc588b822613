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

from smallify.examples import onnx_check as ocheck  # noqa: E402
from smallify.examples import onnx_corpus as oc  # noqa: E402
from smallify.measure.isolated import bench_isolated  # noqa: E402

SPEED_MODELS = ("mobilenet_v3ish", "mobilenet_se", "resnet18_224")


def cpu_line(reduce_range: str = "auto") -> str:
    from smallify.measure.machine import cpu_summary
    from smallify.quant.config import saturating_cpu

    seven = reduce_range == "on" or (reduce_range == "auto" and saturating_cpu())
    return cpu_summary() + ("; INT8 weights on a 7-bit grid (reduce_range)" if seven else "; INT8 weights on the full 8-bit grid")


def ort_peer(model: oc.CorpusModel, folder: Path) -> ocheck.Outcome:
    """ONNX Runtime's own ``quantize_static`` (QDQ, per channel, its defaults otherwise) on the same model and
    calibration data, judged like smallify's int8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            import onnx

            n = len(next(iter(model.calib.values())))
            first = onnx.load(str(model.path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
            step = first.dim_value if first.HasField("dim_value") else 8          # a fixed batch: chunks of it
            self.it = iter({k: v[i:i + step] for k, v in model.calib.items()} for i in range(0, n, step))

        def get_next(self):
            return next(self.it, None)

    out = folder / f"{model.name}.ortq.onnx"
    try:
        quantize_static(str(model.path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
        feeds = {k: v[:16] for k, v in model.calib.items()}
        ref, got = ocheck.run_onnx(model.path, feeds), ocheck.run_onnx(out, feeds)
    except Exception as e:  # noqa: BLE001 - the peer's failures are what this column records
        text = " ".join(str(e).split())
        return ocheck.Outcome(model.name, "ORT q_static", "fails", f"{type(e).__name__}: ...{text[-110:]}")
    err = ((ref - got) ** 2).sum()
    sqnr = float(10 * np.log10((ref ** 2).sum() / err)) if err > 0 else float("inf")
    return ocheck.Outcome(model.name, "ORT q_static", "ok", "", sqnr, float("nan"),
                      ocheck.file_bytes(out) / ocheck.file_bytes(model.path), sum(v for k, v in ocheck.kernels(out).items()
                                                                             if k in ocheck.INTEGER_OPS))


def quality(folder: Path, peers: bool = True, reduce_range="auto") -> list[ocheck.Outcome]:
    outcomes = []
    for name in oc.BUILDERS:
        if name == "mobilenet_v3ish":
            continue
        model = oc.build(name, folder)
        for method in ocheck.METHODS:
            o = ocheck.check(model, method, folder, reduce_range)
            outcomes.append(o)
            print(f"  {name:20s} {method:12s} {o.status}", file=sys.stderr, flush=True)
        if peers:
            outcomes.append(ort_peer(model, folder))
    return outcomes


def print_quality(outcomes: list[ocheck.Outcome]) -> None:
    print(f"\n{'model':20s} {'method':12s} {'result':8s} {'SQNR dB':>8s} {'cosine':>8s} {'size':>6s} {'int ops':>7s}  reason / float layers")
    for o in outcomes:
        if o.status == "ok":
            floats = f"{len(o.float_layers)} float: " + "; ".join(o.float_layers)[:80] if o.float_layers else ""
            print(f"{o.model:20s} {o.method:12s} {'ok':8s} {o.sqnr:8.1f} {o.cosine:8.4f} {o.size_ratio:6.3f} "
                  f"{o.integer_kernels:7d}  {floats}")
        else:
            print(f"{o.model:20s} {o.method:12s} {o.status:8s} {'':8s} {'':8s} {'':6s} {'':7s}  {o.message[:160]}")
    peer = [o for o in outcomes if o.method == "ORT q_static"]
    outcomes = [o for o in outcomes if o.method != "ORT q_static"]
    if peer:
        print(f"\npeer: ONNX Runtime quantize_static (QDQ, per channel) on the same models: "
              f"{sum(o.status == 'ok' for o in peer)} of {len(peer)} ok; fails on: "
              + "; ".join(f"{o.model} ({o.message[:90]})" for o in peer if o.status != "ok"))
        ours = {o.model: o for o in outcomes if o.method == "int8"}
        print("int8 SQNR dB, smallify vs ORT quantize_static where both ran: " + ", ".join(
            f"{o.model} {ours[o.model].sqnr:.1f}/{o.sqnr:.1f}" for o in peer if o.status == "ok" and o.model in ours
            and ours[o.model].status == "ok"))
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
            oc.export_torch(oc.randomize_bn(resnet18(), 0), (torch.from_numpy(calib["input"][:1]),), path, ["input"], 17)
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
    ap.add_argument("--no-peers", action="store_true", help="skip ONNX Runtime's quantize_static column")
    ap.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                    help="int8/dynamic/mixed weights on a 7-bit grid (off: full int8, saturating without VNNI/AMX)")
    ap.add_argument("--runtime", action="append", choices=("onnxruntime", "openvino"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    print(cpu_line(args.reduce_range))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.only_speed:
            start = time.perf_counter()
            ranges = {"auto": "auto", "on": True, "off": False}
            print_quality(quality(folder, not args.no_peers, ranges[args.reduce_range]))
            print(f"quality table: {time.perf_counter() - start:.0f} s")
        if args.speed or args.only_speed:
            speed(folder, args.runtime or ["onnxruntime", "openvino"], args.rounds, args.seconds)


if __name__ == "__main__":
    main()
