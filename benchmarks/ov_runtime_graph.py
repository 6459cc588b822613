"""What OpenVINO's CPU plugin actually runs: kernel types and their runtime precisions, per model.

    python benchmarks/ov_runtime_graph.py model_a.onnx model_b.xml ...

Two INT8 models that compile to the same kernels at the same precisions run the same code; a latency gap
between them is then machine noise, not a property of the files.
"""
from __future__ import annotations

import collections
import sys


def kernels(path: str, threads: int = 2) -> collections.Counter:
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads})
    out = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in ("Const", "Input", "Output"):
            continue
        out[f"{kind} {info['runtimePrecision'].astype(str) if 'runtimePrecision' in info else '?'}"] += 1
    return out


def main(paths: list[str]) -> None:
    from smallify.measure.machine import cpu_summary

    print(cpu_summary())         # the kernels and precisions chosen depend on the CPU (AMX: BF16 by default)
    counts = {p: kernels(p) for p in paths}
    keys = sorted(set().union(*counts.values()))
    print("kernel".ljust(28) + "".join(p.split("/")[-1][:24].rjust(26) for p in paths))
    for k in keys:
        print(k.ljust(28) + "".join(str(counts[p].get(k, 0)).rjust(26) for p in paths))


if __name__ == "__main__":
    main(sys.argv[1:])
