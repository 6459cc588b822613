"""Decode speed of a causal LM: tokens per second generated after a prompt, in the CPU runtime a file targets
(llama.cpp for GGUF files, transformers for the PyTorch model), greedy, a fixed number of new tokens.

    from smallify.measure.decode import decode_speed, llama_cpp_runner, time_in_subprocess
    print(decode_speed(llama_cpp_runner("m.Q4_1.gguf", n_threads=2)))          # in this process
    print(time_in_subprocess("m.Q4_1.gguf", "llama.cpp", threads=2))           # in a fresh process

Speed claims come only from separate processes (measure/isolated.py says why): ``bench_decode`` times each
file in its own fresh process, files taken in turn; ``python -m smallify.measure.decode`` prints the table
with the CPU line. This module imports only the standard library at module level: the child process runs this
file by path and imports just the runtime it times (llama_cpp, or torch and transformers).

Threads: llama.cpp's threads meet at a spinning barrier after every op, so on a machine busier than its cores
one descheduled thread stalls the others (SmolLM2-135M Q4_1 on 2 shared cores at load ~8: 47 tokens/s with
1 thread, 1.5 with 2); time with more threads only on a quiet machine, and say the load with the numbers.

Prefill rate = prompt tokens / time to the first new token; decode rate = (new tokens - 1) / time from the
first new token to the last (each of those costs one forward pass of one token with the KV cache).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUNTIMES = ("llama.cpp", "transformers")
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f")          # the x86 extensions llama.cpp's CPU kernels pick by
INSTALL_LLAMA_CPP = ("pip install llama-cpp-python (builds llama.cpp from source: needs cmake and a C++ "
                     "compiler; CMAKE_ARGS=\"-DGGML_NATIVE=ON\" for this CPU's kernels)")
# a fixed English prompt, tokenized by the model's own tokenizer and cut (or repeated) to the asked length
PROMPT_TEXT = ("The history of computing is a story of making machines smaller and faster. Early computers "
               "filled whole rooms, used vacuum tubes and consumed enormous amounts of power, yet they could "
               "only perform a few thousand operations per second. Transistors replaced the tubes, integrated "
               "circuits put many transistors on one chip, and today a phone holds billions of them.")


def _error(kind: str, message: str) -> Exception:
    """A smallify error of class ``kind``, imported here so that the child process starts without torch."""
    from smallify import errors

    return getattr(errors, kind)(message)


@dataclass
class DecodeResult:
    """Medians over ``repeats`` generations (one warm-up generation before them is not counted)."""
    label: str
    runtime: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    decode_runs: list[float] = field(default_factory=list)      # tokens/s of each repeat
    prefill_runs: list[float] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)          # new tokens produced by each repeat

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeResult":
        return cls(**d)

    def __str__(self) -> str:
        return (f"{self.label} ({self.runtime}, {self.threads} thread(s)): decode {self.decode_tokens_per_s:.1f} "
                f"tokens/s, prefill {self.prefill_tokens_per_s:.1f} tokens/s (median of {len(self.decode_runs)}; "
                f"{self.new_tokens} new tokens after a {self.prompt_tokens}-token prompt)")


@dataclass
class Runner:
    """``generate(prompt_ids, new_tokens) -> (seconds to the first new token, seconds in all, tokens made)``
    greedy, not stopping at end-of-sequence; ``prompt(n)`` gives n token ids of the model's vocabulary."""
    label: str
    runtime: str
    threads: int
    generate: Callable[[list[int], int], tuple[float, float, int]]
    prompt: Callable[[int], list[int]]


def _fit(ids: list[int], n: int) -> list[int]:
    """``ids`` cut or repeated to exactly ``n`` ids."""
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def decode_speed(runner: Runner, prompt_tokens: int | list[int] = 32, new_tokens: int = 64, repeats: int = 3,
                 warmup: int = 1) -> DecodeResult:
    """Greedy generation of exactly ``new_tokens`` after a prompt of ``prompt_tokens`` tokens (or these ids),
    ``warmup`` untimed generations then ``repeats`` timed ones; the medians of the rates."""
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, (int, list)) or \
            (isinstance(prompt_tokens, int) and prompt_tokens < 1) or (isinstance(prompt_tokens, list) and not prompt_tokens):
        raise _error("ConfigError", f"prompt_tokens={prompt_tokens!r}; accepted: an int >= 1 or a non-empty list of token ids")
    for name, value, low in (("new_tokens", new_tokens, 2), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _error("ConfigError", f"{name}={value!r}; accepted: an int >= {low}")
    prompt = runner.prompt(prompt_tokens) if isinstance(prompt_tokens, int) else [int(t) for t in prompt_tokens]
    for _ in range(warmup):
        runner.generate(prompt, new_tokens)
    decode, prefill, made = [], [], []
    for _ in range(repeats):
        first, total, n = runner.generate(prompt, new_tokens)
        prefill.append(len(prompt) / first)
        decode.append((n - 1) / (total - first))
        made.append(n)
    return DecodeResult(runner.label, runner.runtime, runner.threads, len(prompt), new_tokens,
                        statistics.median(decode), statistics.median(prefill), decode, prefill, made)


# ---------------------------------------------------------------------------------------------------- runners

def transformers_runner(model, tokenizer=None, threads: int | None = None, label: str | None = None) -> Runner:
    """A transformers causal LM (any dtype, on CPU) under ``generate``: greedy, ``min_new_tokens`` =
    ``max_new_tokens`` so that end-of-sequence does not stop it, no grad. ``threads`` sets torch's intra-op
    threads (None: as already set). Without a tokenizer the prompt is a fixed sequence of ordinary ids."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    if threads is not None:
        torch.set_num_threads(threads)

    class FirstToken(BaseStreamer):               # generate() puts the prompt, then each new token
        def __init__(self):
            self.puts, self.first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    def generate(prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        ids = torch.tensor([prompt], dtype=torch.long)
        streamer = FirstToken()
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = model.generation_config.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=streamer,
                                 pad_token_id=0 if pad is None else pad)
            end = time.perf_counter()
        return streamer.first - start, end - start, int(out.shape[1] - ids.shape[1])

    def prompt(n: int) -> list[int]:
        if tokenizer is not None:
            return _fit(tokenizer(PROMPT_TEXT)["input_ids"], n)
        vocab = model.config.vocab_size
        return [3 + (i * 7919) % (vocab - 3) for i in range(n)]     # past the usual special ids 0..2

    return Runner(label or type(model).__name__, "transformers", torch.get_num_threads(), generate, prompt)


def llama_cpp_runner(gguf_path: str | os.PathLike, n_threads: int = 2, n_ctx: int = 512,
                     label: str | None = None) -> Runner:
    """A GGUF file in llama.cpp (llama-cpp-python, imported here: an optional dependency), ``n_threads`` for
    both prompt and generation, greedy sampling in llama.cpp's own sampler."""
    path = Path(gguf_path)
    if not path.is_file():
        raise _error("ModelError", f"GGUF file {str(path)!r} does not exist")
    try:
        import llama_cpp
    except ImportError as e:
        raise _error("ModelError", f"timing {path.name} in llama.cpp needs llama-cpp-python, which is not "
                                   f"importable ({e}); install it with {INSTALL_LLAMA_CPP}") from None
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_threads=n_threads, n_threads_batch=n_threads, n_ctx=n_ctx,
                              verbose=False)
    except (ValueError, RuntimeError) as e:
        from smallify.errors import first_line

        raise _error("ModelError", f"llama.cpp cannot load {path}: {first_line(e)}") from None

    def generate(prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        if len(prompt) + new_tokens > n_ctx:
            raise _error("ConfigError", f"prompt {len(prompt)} + new_tokens {new_tokens} tokens exceed n_ctx={n_ctx}; "
                                        f"accepted: at most n_ctx in all (pass a larger n_ctx)")
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = llm.sample(temp=0.0, repeat_penalty=1.0)           # temp 0: llama.cpp's greedy sampler
        first, made = time.perf_counter(), 1
        while made < new_tokens:
            llm.eval([token])
            token = llm.sample(temp=0.0, repeat_penalty=1.0)
            made += 1
        return first - start, time.perf_counter() - start, made

    def prompt(n: int) -> list[int]:
        return _fit(llm.tokenize(PROMPT_TEXT.encode(), add_bos=True), n)

    return Runner(label or path.name, "llama.cpp", n_threads, generate, prompt)


def load_transformers(path: str | os.PathLike):
    """(model, tokenizer) in float32 from a Hugging Face folder or a GGUF file (dequantized by transformers);
    tokenizer None for a folder that holds none (the prompt is then a fixed sequence of ids)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    folder, kw = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    has_tokenizer = "gguf_file" in kw or any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(str(folder), **kw) if has_tokenizer else None


# ---------------------------------------------------------------------------------------- separate processes

def _child(spec: dict) -> DecodeResult:
    """What the fresh process runs: load one file in its runtime and time it."""
    if spec["runtime"] == "llama.cpp":
        runner = llama_cpp_runner(spec["path"], spec["threads"], label=spec["label"])
    else:
        model, tokenizer = load_transformers(spec["path"])
        runner = transformers_runner(model, tokenizer, spec["threads"], spec["label"])
    return decode_speed(runner, spec["prompt_tokens"], spec["new_tokens"], spec["repeats"])


def time_in_subprocess(path: str | os.PathLike, runtime: str = "llama.cpp", threads: int = 2, prompt_tokens: int = 32,
                       new_tokens: int = 64, repeats: int = 3, label: str | None = None) -> DecodeResult:
    """``decode_speed`` of one file, measured in a fresh Python process that imports only its runtime
    (this file run by path, as measure/isolated.py runs child_timer.py)."""
    if runtime not in RUNTIMES:
        raise _error("ConfigError", f"runtime {runtime!r} is not supported; accepted: {', '.join(RUNTIMES)}")
    if not Path(path).exists():
        raise _error("ModelError", f"model file {str(path)!r} does not exist")
    spec = {"path": str(path), "runtime": runtime, "threads": threads, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "label": label or Path(path).name}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise _error("ModelError", f"timing {path} in {runtime} failed: {last[:300]}")
    return DecodeResult.from_dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_decode(models: dict[str, tuple[str, str | os.PathLike]], threads: int = 2, prompt_tokens: int = 32,
                 new_tokens: int = 64, repeats: int = 3, rounds: int = 1, progress=None) -> list[DecodeResult]:
    """``models`` maps a label to (runtime, path); each is timed in its own fresh process, models taken in turn
    for ``rounds`` rounds; a model's rates are the medians over all its repeats of all rounds."""
    runs: dict[str, list[DecodeResult]] = {}
    for r in range(rounds):
        for label, (runtime, path) in models.items():
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: {label} ({runtime})")
            runs.setdefault(label, []).append(time_in_subprocess(path, runtime, threads, prompt_tokens, new_tokens,
                                                                 repeats, label))
    merged = []
    for label, results in runs.items():
        d = results[0].to_dict()
        for key in ("decode_runs", "prefill_runs", "generated"):
            d[key] = [x for res in results for x in getattr(res, key)]
        d["decode_tokens_per_s"] = statistics.median(d["decode_runs"])
        d["prefill_tokens_per_s"] = statistics.median(d["prefill_runs"])
        merged.append(DecodeResult.from_dict(d))
    return merged


def format_table(results: list[DecodeResult], base: str | None = None) -> str:
    """A text table with the CPU line; ``x base`` = decode rate / the decode rate of label ``base`` (default:
    the first row)."""
    from smallify.measure.machine import cpu_flags, cpu_summary

    ref = next((r for r in results if r.label == base), results[0]).decode_tokens_per_s
    r0, flags = results[0], cpu_flags()
    lines = [cpu_summary() + "; " + ", ".join(f"{f.upper()} {'yes' if f in flags else 'no'}" for f in KERNEL_FLAGS), f"{r0.new_tokens} new tokens after a {r0.prompt_tokens}-token prompt, greedy, "
                            f"{r0.threads} thread(s), median of {len(r0.decode_runs)} generation(s), one process per model",
             f"{'model':<28} {'runtime':<13} {'decode tok/s':>12} {'(min-max)':>13} {'prefill tok/s':>13} {'x base':>7}"]
    for r in results:
        spread = f"{min(r.decode_runs):.1f}-{max(r.decode_runs):.1f}"
        lines.append(f"{r.label:<28} {r.runtime:<13} {r.decode_tokens_per_s:>12.1f} {spread:>13} "
                     f"{r.prefill_tokens_per_s:>13.1f} {r.decode_tokens_per_s / ref:>7.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- GGUF conversion

def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, weight_type: str = "F16", keep=()) -> Path:
    """A copy of GGUF file ``src`` whose 2-D tensors are dequantized and stored as ``weight_type`` (F16, F32,
    or a type gguf-py can quantize: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), 1-D tensors (norms) as F32; tensors named in
    ``keep`` are copied as they are. All metadata is copied (general.file_type set to match)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    from smallify.files import write_atomic

    qtype = getattr(gguf.GGMLQuantizationType, weight_type, None)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{weight_type}", gguf.LlamaFileType.ALL_F32)
    if qtype is None or weight_type not in ("F16", "F32", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        raise _error("ConfigError", f"weight_type {weight_type!r}; accepted: F16, F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0")
    reader = gguf.GGUFReader(str(src))

    def write(tmp: Path) -> None:
        arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
        writer = gguf.GGUFWriter(str(tmp), arch)
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            value = int(file_type) if f.name == gguf.Keys.General.FILE_TYPE else f.contents()
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, value, f.types[0], sub_type=sub)
        for t in reader.tensors:
            if t.name in keep:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
                continue
            w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])   # numpy order
            if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(t.name, w.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(t.name, w.astype(np.float16))
            else:
                writer.add_tensor(t.name, quantize(w, qtype), raw_dtype=qtype)     # bytes; shape from them
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic(dst, write, inputs=(src,))


def _main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m smallify.measure.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", action="append", default=[], metavar="LABEL=FILE", help="a GGUF file timed in llama.cpp")
    p.add_argument("--transformers", action="append", default=[], metavar="LABEL=PATH",
                   help="a Hugging Face folder or GGUF file timed in transformers (float32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--base", default=None, help="the label the ratios are taken against (default: the first)")
    a = p.parse_args(argv)
    models = {}
    for runtime, items in (("llama.cpp", a.gguf), ("transformers", a.transformers)):
        for item in items:
            label, _, path = item.rpartition("=")
            models[label or Path(path).name] = (runtime, path)
    if not models:
        p.error("give at least one --gguf or --transformers model")
    results = bench_decode(models, a.threads, a.prompt, a.new, a.repeats, a.rounds,
                           progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(results, a.base))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(json.loads(sys.argv[2])).to_dict()))
    else:
        _main(sys.argv[1:])
