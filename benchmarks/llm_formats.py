"""The files smallify writes for a quantized LLM, loaded back by their runtimes: SmolLM2-135M quantized once
(GPTQ, 4-bit, group 64, symmetric: llama.cpp's Q4_0 grid), written as a Hugging Face folder (compressed-tensors),
a GGUF with the float embedding (F16) and a GGUF with the template's Q8_0 embedding; the perplexity of each as
its loader gives it back (transformers for the folder and the GGUFs) against smallify's own model, the sizes,
and decode tokens/s of the GGUFs against an F16 GGUF of the float model in llama.cpp, each file in its own
process (smallify.measure.decode).

    python benchmarks/llm_formats.py [--eval-tokens 20480] [--samples 32] [--threads 1] [--out out/bench/llm_formats]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for the decode timing")
    ap.add_argument("--out", default="out/bench/llm_formats")
    args = ap.parse_args()

    import torch
    import transformers

    import smallify as sm
    from smallify.examples.smollm2 import gguf_path
    from smallify.measure.decode import bench_decode, convert_gguf, format_table
    from smallify.measure.machine import cpu_summary
    from smallify.measure.perplexity import eval_text
    from smallify.measure.size import file_size

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = gguf_path()
    model, tok, _ = sm.llm.load_causal_lm(src)
    t0 = time.perf_counter()
    sm.quantize(model, sm.llm.GPTQ(bits=4, group_size=64, sym=True, samples=args.samples),
                data=sm.llm.default_texts(), tokenizer=tok)
    seconds = time.perf_counter() - t0
    text = eval_text()

    def ppl(m):
        return sm.measure.perplexity(m, text, tok, seq_len=512, max_tokens=args.eval_tokens).ppl

    rows = {"smallify (in process)": (ppl(model), None)}
    hf = sm.llm.save_hf(model, out / "hf", tok, force=True)
    g16 = sm.llm.save_gguf(model, out / "q4_0.f16-embedding.gguf", template=src, force=True)
    g8 = sm.llm.save_gguf(model, out / "q4_0.gguf", template=src, force=True, embedding_type="Q8_0")
    del model
    rows["HF folder (transformers)"] = (ppl(transformers.AutoModelForCausalLM.from_pretrained(hf).eval()), hf)
    for path in (g16, g8):
        m = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
        rows[f"{path.name} (transformers)"] = (ppl(m), path)
    f16 = out / "float.f16.gguf"
    if not f16.exists():
        convert_gguf(src, f16, "F16")
    base = rows["smallify (in process)"][0]
    print(f"\nSmolLM2-135M GPTQ 4-bit g64 sym ({args.samples} calibration windows, quantized in {seconds:.0f} s); "
          f"perplexity on {args.eval_tokens} tokens of pydoc topics; {cpu_summary()}")
    print(f"{'file':<44} {'ppl':>8} {'vs smallify':>12} {'size MB':>9}")
    for name, (value, path) in rows.items():
        size = f"{file_size(path) / 1e6:9.1f}" if path else f"{'':>9}"
        print(f"{name:<44} {value:8.3f} {100 * (value / base - 1):+11.2f}% {size}")
    print(f"{'float F16 GGUF':<44} {'':>8} {'':>12} {file_size(f16) / 1e6:9.1f}")
    record = {"quantize_s": seconds, "ppl": {k: v for k, (v, _) in rows.items()}}
    try:
        results = bench_decode({"F16 (float)": ("llama.cpp", str(f16)), "Q4_0, Q8_0 embedding": ("llama.cpp", str(g8)),
                                "Q4_0, F16 embedding": ("llama.cpp", str(g16))}, threads=args.threads, rounds=2)
        print(format_table(results, base="F16 (float)"))
        record["decode"] = {r.label: r.to_dict() for r in results}
    except (sm.SmallifyError, OSError, RuntimeError) as e:     # llama-cpp-python is optional: say why not
        print(f"no decode timing: {sm.errors.first_line(e)}")
    (out / "results.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
