"""LLM weight-only quantization of SmolLM2-135M: smallify's methods and the peers, same model, same text, one run.

    python benchmarks/llm_weight_only.py [--settings 4bit-g64-asym,3bit-g64-asym,4bit-g32-asym] [--rows fp32,gptq,...]
        [--eval-tokens 20480] [--calib-samples 32] [--out out/bench/llm_weight_only.jsonl] [--quick]

Perplexity at seq 512 on the first --eval-tokens tokens of CPython's pydoc_data.topics (smallify.measure.perplexity's
eval_text; windows of 512, no context across windows); calibration on --calib-samples windows of 512 tokens of
another text (stdlib docstrings, smallify.llm.text.default_texts). Every method keeps the embeddings and the
(tied) LM head in float and quantizes the decoder's Linear layers.

Rows: FP32; smallify RTN, DataFree, GPTQ, AWQ, AWQ+GPTQ; HQQ (hqq's AutoHQQHFModel on CPU, float32); NNCF
compress_weights on the torch model (data-free, AWQ + scale estimation, and + GPTQ); ONNX Runtime's
MatMulNBitsQuantizer (RTN, HQQ, GPTQ, k-quant) on a logits-only FP32 ONNX export of fixed shape [1, 512].

Every row runs in a fresh process of its own (benchmarks/_llm_rows.py), one after another: its quantize seconds
(wall, and CPU seconds of all its threads) and peak RSS are its own. "peak RSS" is the process's (ru_maxrss:
loading the model included, evaluation not); "quantize peak" the high-water mark from the end of loading to the
end of quantizing and saving (Linux: /proc/self/clear_refs reset, then VmHWM). Sizes are of each method's saved
file; the FP32 ONNX export stores the tied embedding twice (Gather and LM head), so the ORT files carry it twice. Each finished row is
appended to --out (JSON lines); a re-run skips the rows already there (--redo-errors: except those that ended in
an error), so a killed benchmark resumes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _llm_rows import ONNX_NAME, ORT, ROWS, parse_setting

SETTINGS = ("4bit-g64-asym", "3bit-g64-asym", "4bit-g32-asym")
LABELS = {"fp32": "FP32", "rtn": "smallify RTN", "datafree": "smallify DataFree", "datafree-gen": "smallify DataFree (generated text)", "gptq": "smallify GPTQ",
          "awq": "smallify AWQ", "awq+gptq": "smallify AWQ+GPTQ", "hqq": "HQQ (hqq 0.2, CPU)",
          "nncf": "NNCF data-free", "nncf-awq-se": "NNCF AWQ+SE", "nncf-awq-se-gptq": "NNCF AWQ+SE+GPTQ",
          "ort-rtn": "ORT MatMulNBits RTN", "ort-hqq": "ORT MatMulNBits HQQ", "ort-gptq": "ORT MatMulNBits GPTQ",
          "ort-kquant": "ORT MatMulNBits k-quant"}


def row_key(setting: str, row: str, eval_tokens: int, calib: int) -> str:
    setting = "-" if row in ("fp32", "onnx-export") else setting
    calib = 0 if row in ("fp32", "onnx-export", "rtn", "datafree", "datafree-gen", "nncf", "hqq", "ort-rtn", "ort-hqq",
                         "ort-kquant") else calib
    return f"{setting}|{row}|eval{eval_tokens}|calib{calib}"


def read_done(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    return done


def run_one(setting: str, row: str, args, work: Path) -> dict:
    """The row's result from a fresh process; a process that dies without one (killed, out of memory) gives an
    error row."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE / "_llm_rows.py"), "--row", row, "--setting", setting,
               "--eval-tokens", str(args.eval_tokens), "--calib-samples", str(args.calib_samples),
               "--work", str(work), "--result", str(result), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, check=False)
        if proc.returncode == 0 and result.exists():
            return json.loads(result.read_text())
        how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else \
            f"exited with status {proc.returncode}"
        return {"error": f"crashed: the row's process {how} and left no result"}


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


HEAD = ["setting", "method", "ppl", "vs FP32", "quantize s", "CPU s", "peak RSS GiB", "quantize peak GiB", "size MB",
        "size from", "tokens/s"]


def table(records: list[dict], fp32_ppl: float | None) -> str:
    """A Markdown table; tokens/s is left empty (measured by smallify.measure.decode, in its own processes)."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in records:
        res, label = r["result"], LABELS[r["row"]]
        if "error" in res:
            cells = [r["setting"], label, res["error"]] + [""] * (len(HEAD) - 3)
        else:
            quantized = res.get("quantize_s") is not None
            change = None if fp32_ppl is None or r["row"] == "fp32" else 100 * (res["ppl"] / fp32_ppl - 1)
            size = res.get("size_bytes")
            cells = [r["setting"], label + (f" ({res['note']})" if res.get("note") else ""), f"{res['ppl']:.3f}",
                     fmt(change, "+.1f") + ("%" if change is not None else ""), fmt(res.get("quantize_s"), ".1f"),
                     fmt(res.get("quantize_cpu_s") if quantized else None, ".1f"), fmt(res.get("peak_rss_gb"), ".2f"),
                     fmt(res.get("quantize_peak_rss_gb") if quantized else None, ".2f"),
                     fmt(None if size is None else size / 1e6, ".1f"), res.get("size_source", ""), ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--out", default="out/bench/llm_weight_only.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo-errors", action="store_true", help="run again the rows that ended in an error")
    ap.add_argument("--quick", action="store_true", help="for testing: 2 windows of evaluation, 4 of calibration")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_tokens, args.calib_samples = 1024, 4
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        parse_setting(s)
    rows = [r.strip().lower() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {', '.join(bad)}; accepted: {', '.join(ROWS)}")
    rows = [r for r in ROWS if r in rows]                # table order
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(out.stem + ".work")
    work.mkdir(exist_ok=True)
    done = read_done(out)

    plan = [("-", "fp32")] if "fp32" in rows else []
    plan += [(s, r) for s in settings for r in rows if r != "fp32"]
    for setting, row in plan:
        key = row_key(setting, row, args.eval_tokens, args.calib_samples)
        if key in done and not (args.redo_errors and "error" in done[key]["result"]):
            continue
        if row in ORT and not (work / ONNX_NAME).exists():
            print("== ONNX export (fixed [1, 512], logits only) for the ONNX Runtime rows", file=sys.stderr)
            export = run_one("-", "onnx-export", args, work)
            if "error" in export or not (work / ONNX_NAME).exists():
                result = {"error": f"ONNX export failed: {export.get('error', 'no file written')}"}
                done[key] = {"key": key, "setting": setting, "row": row, "result": result}
                with out.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
                continue
            print(f"   export took {export['export_s']:.0f} s", file=sys.stderr)
        print(f"== {setting} {LABELS[row]}", file=sys.stderr)
        result = run_one(setting, row, args, work)
        done[key] = {"key": key, "setting": setting, "row": row, "eval_tokens": args.eval_tokens,
                     "calib_samples": args.calib_samples, "result": result}
        with out.open("a") as f:
            f.write(json.dumps(done[key]) + "\n")

    records = [done[row_key(s, r, args.eval_tokens, args.calib_samples)] for s, r in plan]
    fp32 = done.get(row_key("-", "fp32", args.eval_tokens, args.calib_samples))
    fp32_ppl = fp32["result"].get("ppl") if fp32 else None
    from smallify.measure.machine import cpu_summary

    print(f"\nSmolLM2-135M weight-only, perplexity at seq 512 on {args.eval_tokens // 512} windows of pydoc_data.topics; "
          f"calibration {args.calib_samples} x 512 tokens of stdlib docstrings")
    print(cpu_summary() + f"; {args.threads} threads")
    print("command: python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]) + "\n")
    print(table(records, fp32_ppl))


if __name__ == "__main__":
    main()
