"""Where the time of an INT8 MobileNet goes in ONNX Runtime: per-operator time from ORT's profiler.

    python benchmarks/ort_op_profile.py                  # MobileNetV3-style 128x128, batch 32
    python benchmarks/ort_op_profile.py --batch 1

Builds the corpus's MobileNetV3-style model and two INT8 versions: smallify's default and ONNX Runtime's
``quantize_static`` (QDQ, U8S8, per channel, pre-processed). Each model is profiled in its own fresh process
(2 threads, no spinning, 10 profiled runs): total and the operators that take the time.
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def profile_one(path: str, batch: int, runs: int = 10) -> None:
    """Run in a child process: print JSON {op type: [ms per run, nodes]} over ``runs`` profiled runs (every run
    of the session is profiled, the first included)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 128, 128)).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(runs):
        session.run(None, {name: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    print(json.dumps({op: [total[op] / runs / 1e3, count[op] // runs] for op in total}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        profile_one(args.one, args.batch)
        return
    import smallify as sm
    from ptq_cnn import ort_quantize_static
    from smallify.examples import onnx_corpus as oc
    from smallify.measure.machine import cpu_summary

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        m = oc.build("mobilenet_v3ish", folder)
        files = {"FP32": m.path, "smallify INT8": folder / "sm.onnx", "ORT quantize_static": folder / "ort.onnx"}
        sm.quantize(str(m.path), sm.Int8Static(), data=m.calib, out=str(files["smallify INT8"]), progress=False)
        ort_quantize_static(m.path, files["ORT quantize_static"], m.calib["input"], uint8=True)
        print(f"ONNX Runtime profile, MobileNetV3-style 128x128, batch {args.batch}, 2 threads, each model in its own "
              f"process; {cpu_summary()}")
        for label, path in files.items():
            out = subprocess.run([sys.executable, __file__, "--one", str(path), "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True).stdout
            ops = json.loads(out.strip().splitlines()[-1])
            print(f"{label}: {sum(ms for ms, _ in ops.values()):.1f} ms per run")
            for op, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:6]:
                print(f"  {op:26s} {ms:8.2f} ms  x{n}")


if __name__ == "__main__":
    main()
