"""Fuzz the two loaders that read files users are handed: ``smallify.load`` (.smallify containers) and the
calibration .npz reader (``smallify.data.load_npz``). Every input must give a typed smallify error or a
valid result (a model that loads also computes: each is run once on a batch of ones): never another
exception, a hang or unbounded memory.

    python benchmarks/fuzz_loaders.py --target container --execs 1000000      # by hand (the issue's ask)
    python benchmarks/fuzz_loaders.py --target manifest --execs 200000
    python benchmarks/fuzz_loaders.py --target npz --execs 200000
    python benchmarks/fuzz_loaders.py --engine atheris --target container --execs 1000000

Targets: ``container`` mutates the bytes of valid .smallify files (int4/int8/fp8/fp16/dynamic/sparse/float,
several grids); ``manifest`` mutates only the manifest's JSON inside a valid file (reaches the loader's
checks behind the safetensors layer); ``npz`` mutates valid calibration files (stored and deflated).
Engines: ``mutate`` (default: seeded, structure-aware byte mutations, no extra dependency, reproducible with
--seed) and ``atheris`` (coverage-guided libFuzzer over smallify's code, when atheris is installed: it also
enforces -timeout and -rss_limit_mb). Hangs: each input gets --timeout seconds (SIGALRM). Memory: the
peak resident set is reported; any MemoryError is a finding. Findings are written to --crashes (a folder).
The coverage-guided engine needs ``pip install atheris`` (not a dependency of smallify).

Measured (November 2026, the 2-core machine shared with other jobs; findings fixed as they came):
  container, mutate, seed 1   500,000 execs   1,051 s   0 findings (models not run then)   peak RSS 265 MiB
  container, mutate, seed 2   250,000 execs     478 s   0 findings                         peak RSS 262 MiB
  container, atheris          150,000 execs     357 s   0 crashes (479 edges)              rss 308 MB
  manifest,  mutate, seed 0    25,000 execs             1 finding: no 'config' key -> KeyError (fixed)
  manifest,  mutate, seed 3    20,000 execs      46 s   0 findings
  manifest,  atheris           50,000 execs      83 s   0 crashes (494 edges)
  npz,       mutate, seed 0     5,000 execs       1 s   0 findings
  npz,       atheris          ~210,000 execs   ~110 s   2 crashes before the fixes: a member named '' ->
                                                         IndexError in zipfile; a header numpy cannot tokenize
                                                         -> TokenError; then 200,000 execs, 0 crashes
  container, mutate, seed 0 1,000,000 execs     648 s   0 findings (68,167 loaded and run, 931,833 typed
                                                         errors)                             peak RSS 279 MiB
  (`--target container --execs 1000000`, 23 November 2026, AMD EPYC with AVX2 only, the machine otherwise idle)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

warnings.filterwarnings("ignore")

import smallify as sm  # noqa: E402
from smallify.data import load_npz  # noqa: E402
from smallify.errors import SmallifyError  # noqa: E402


class Tiny(nn.Module):
    """The architecture every seed container is saved from (a Linear stack large enough for packing,
    grouping and sparse storage)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def container_seeds() -> list[bytes]:
    """Valid .smallify files: float, sparse float, int4 (sym/asym, per channel/group), int8 per tensor,
    int3, fp8, fp16, bf16, dynamic int8."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    sparse = tiny()
    with torch.no_grad():
        sparse.fc1.weight[sparse.fc1.weight.abs() < sparse.fc1.weight.abs().quantile(0.7)] = 0
    models = [tiny(), sparse,
              sm.quantize(tiny(), sm.WeightOnly(bits=4, group_size=None)),
              sm.quantize(tiny(), sm.WeightOnly(bits=4, group_size=16, symmetric=False)),
              sm.quantize(tiny(), sm.WeightOnly(bits=3, group_size=None)),
              sm.quantize(tiny(), sm.Int8Static(per_channel=False), x, progress=False),
              sm.quantize(tiny(), sm.FP8Static(), x, progress=False),
              sm.quantize(tiny(), sm.Float16()), sm.quantize(tiny(), sm.Float16(dtype="bf16")),
              sm.quantize(tiny(), sm.Int8Dynamic())]
    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, m in enumerate(models):
            sm.save(m, Path(tmp) / f"{i}.smallify")
            seeds.append((Path(tmp) / f"{i}.smallify").read_bytes())
    return seeds


def npz_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    arrays = [dict(input=rng.standard_normal((8, 1, 4, 4)).astype(np.float32)),
              dict(a=rng.integers(0, 9, (5, 3)), b=rng.standard_normal((5, 2)).astype(np.float16)),
              dict(x=np.asfortranarray(rng.standard_normal((6, 4))), y=np.arange(6, dtype=">i4")),
              dict(mask=rng.random((4, 7)) > 0.5)]
    seeds = []
    for i, a in enumerate(arrays):
        for save in (np.savez, np.savez_compressed):
            buf = io.BytesIO()
            save(buf, **a)
            seeds.append(buf.getvalue())
    return seeds


def split_manifest(blob: bytes) -> tuple[dict, bytes, str]:
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    return header, blob[8 + n:], header["__metadata__"]["smallify"]


def join_manifest(header: dict, data: bytes, manifest: str) -> bytes:
    header = dict(header, __metadata__={"smallify": manifest})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# --------------------------------------------------------------------------------------------- mutations

INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"0", b"-1", b"1e308", b"NaN", b"null", b"true", b"[]", b"{}",
               b'"int"', b'"fp8"', b'"float"', b"99", b"4294967296", b"18446744073709551615", b'"U8"', b'"I8"',
               b'"F16"', b'"F8_E4M3"', b'"BF16"']


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One to four of: flip bits, overwrite with interesting tokens, insert/delete/duplicate ranges,
    truncate, splice with another seed, change a decimal number."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(b)
        if op == 0 and n:                                           # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(n)
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                                         # token overwrite
            tok = rng.choice(INTERESTING)
            i = rng.randrange(n)
            b[i:i + len(tok)] = tok
        elif op == 2:                                               # insert random bytes
            i = rng.randrange(n + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif op == 3 and n:                                         # delete a range
            i = rng.randrange(n)
            del b[i:i + rng.randint(1, 64)]
        elif op == 4 and n:                                         # truncate
            del b[rng.randrange(n):]
        elif op == 5 and n:                                         # duplicate a range
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 256))
            b[i:i] = b[i:j]
        elif op == 6:                                               # splice with another seed
            other = rng.choice(pool)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + bytearray(other[j:])
        elif op == 7 and n:                                         # a decimal number changed
            digits = [i for i in range(n) if 48 <= b[i] <= 57]
            if digits:
                i = rng.choice(digits)
                b[i:i + 1] = str(rng.choice([0, 1, 2, 7, 9, 10, 31, 32, 33, 64, 255, 65536, 10**12])).encode()
    return bytes(b)


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2, 3, 4, 8, 9, 16, 32, 99, 2**31, 2**63, 10**30])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan")])
    if kind == 4:
        return rng.choice(["", "int", "fp8", "float", "e4m3", "e5m2", "weight_only", "int8_static", "float16",
                           "int8_dynamic", "fp8_static", "fc1", "fc2", "add", "smallify"])
    if kind == 5:
        return rng.choice([[], {}])
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    if kind == 7:
        return {rng.choice(["kind", "bits", "shape", "spec", "fmt", "x"]): random_json(rng, depth + 1)}
    return [rng.randint(-2, 70) for _ in range(rng.randint(0, 5))]


def mutate_json(text: bytes, rng: random.Random) -> bytes:
    """Structure-aware: parse, change one to three nodes (replace a value, drop a key, add a key, resize a
    list), write back. Falls back to byte mutations for text that is not JSON."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    for _ in range(rng.randint(1, 3)):
        nodes, stack = [], [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, (dict, list)):
                nodes.append(node)
                stack.extend(node.values() if isinstance(node, dict) else node)
        node = rng.choice(nodes)
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = rng.randrange(4)
        if op == 0 and keys:
            node[rng.choice(keys)] = random_json(rng)
        elif op == 1 and keys:
            del node[rng.choice(keys)]
        elif op == 2 and isinstance(node, dict):
            node[rng.choice(["config", "layers", "sparse", "removed_branches", "version", "fc1", "fc3", "spec",
                             "shape", "bits", "group_size", "name", "per_channel"])] = random_json(rng)
        elif op == 3 and isinstance(node, list):
            node.append(random_json(rng)) if rng.random() < 0.5 or not node else node.pop()
    return json.dumps(doc).encode()


# --------------------------------------------------------------------------------------------- targets

class Target:
    """``run(bytes)`` feeds one input to a loader; returns 'ok' or 'error' (typed), raises anything else."""

    def __init__(self, name: str, workdir: Path, forward: bool = True):
        self.name, self.path = name, workdir / ("input.npz" if name == "npz" else "input.smallify")
        self.forward = forward      # also run every loaded model once (a model that loads must compute)
        if name == "npz":
            self.seeds = npz_seeds()
        else:
            self.seeds = container_seeds()
        if name == "manifest":
            self.parts = [split_manifest(s) for s in self.seeds]
            self.seeds_text = [p[2].encode() for p in self.parts]

    def materialize(self, data: bytes, rng: random.Random | None = None) -> bytes:
        """The file bytes for one fuzz input (the manifest target puts the input inside a seed's header)."""
        if self.name != "manifest":
            return data
        header, tensors, _ = self.parts[(rng.randrange(len(self.parts)) if rng else data[0] if data else 0)
                                        % len(self.parts)]
        return join_manifest(header, tensors, data.decode("utf-8", "replace"))

    def run(self, blob: bytes) -> str:
        self.path.write_bytes(blob)
        try:
            if self.name == "npz":
                arrays = load_npz(self.path, max_samples=4, max_bytes=64 << 20)
                assert all(isinstance(a, np.ndarray) and a.shape[0] <= 4 for a in arrays.values())
                for a in arrays.values():
                    torch.from_numpy(a)          # usable as a tensor: native byte order, a real dtype
            else:
                model = sm.load(self.path, tiny())
                assert isinstance(model, nn.Module)
                if self.forward:
                    y = model(torch.ones(2, 32))
                    assert y.shape == (2, 8), f"a loaded model answers with shape {tuple(y.shape)}"
            return "ok"
        except SmallifyError as e:
            assert str(e) and "\n" not in str(e).strip(), f"a typed error of more than one line: {e!r}"
            return "error"


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("no answer within the time limit")


def run_mutate(target: Target, execs: int, seed: int, timeout: float, crashes: Path, report_every: float):
    rng = random.Random(seed)
    pool = target.seeds_text if target.name == "manifest" else target.seeds
    signal.signal(signal.SIGALRM, _alarm)
    counts, found, start, last = {"ok": 0, "error": 0}, {}, time.perf_counter(), time.perf_counter()
    corpus = list(pool)
    for i in range(execs):
        if i < len(pool):
            data = pool[i]
        elif target.name == "manifest" and rng.random() < 0.7:
            data = mutate_json(rng.choice(corpus), rng)
        else:
            data = mutate(rng.choice(corpus), rng, pool)
        blob = join_manifest(*target.parts[i]) if target.name == "manifest" and i < len(pool) else \
            target.materialize(data, rng)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            outcome = target.run(blob)
            counts[outcome] += 1
            if outcome == "ok" and len(corpus) < 512:
                corpus.append(data)         # inputs that load are kept: later mutations start deeper
        except BaseException as e:     # noqa: BLE001 -- every other outcome is a finding
            if isinstance(e, KeyboardInterrupt):
                raise
            key = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if key not in found:
                crashes.mkdir(parents=True, exist_ok=True)
                name = crashes / f"{target.name}-{len(found)}.bin"
                name.write_bytes(blob)
                found[key] = (name, "".join(traceback.format_exception(e))[-1500:])
                print(f"FINDING {key}  (input saved as {name})", flush=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if time.perf_counter() - last > report_every:
            last = time.perf_counter()
            rate = (i + 1) / (last - start)
            print(f"  {i + 1:,} execs, {rate:,.0f}/s, ok {counts['ok']:,}, typed errors {counts['error']:,}, "
                  f"findings {len(found)}", flush=True)
    return counts, found, time.perf_counter() - start


def run_atheris(target: Target, execs: int, timeout: float, crashes: Path, rss_mb: int):
    import atheris

    corpus_dir = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-"))
    for i, s in enumerate(target.seeds_text if target.name == "manifest" else target.seeds):
        (corpus_dir / f"seed{i}").write_bytes(s)

    def one(data: bytes) -> None:
        target.run(target.materialize(data))

    import inspect
    import zipfile

    count = 0          # coverage: every function of smallify, zipfile and json (torch and numpy stay as they are)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("smallify", "zipfile", "json") and module is not None:
            for obj in list(vars(module).values()):
                for fn in ([obj] if inspect.isfunction(obj) else
                           [f for f in vars(obj).values() if inspect.isfunction(f)] if inspect.isclass(obj) else []):
                    if getattr(fn, "__module__", None) == name:
                        atheris.instrument_func(fn)
                        count += 1
    print(f"atheris: {count} functions instrumented", flush=True)
    assert zipfile

    crashes.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], f"-runs={execs}", f"-timeout={max(1, int(timeout))}", f"-rss_limit_mb={rss_mb}",
                   f"-artifact_prefix={crashes}/", "-max_len=65536", str(corpus_dir)], one)
    atheris.Fuzz()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=["container", "manifest", "npz"], default="container")
    ap.add_argument("--engine", choices=["mutate", "atheris"], default="mutate")
    ap.add_argument("--execs", type=int, default=100_000, help="inputs to run (the issue asks >= 1,000,000 for "
                    "the container loader by hand)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take (a hang otherwise)")
    ap.add_argument("--rss-limit-mb", type=int, default=4096, help="atheris: memory limit per process")
    ap.add_argument("--no-forward", action="store_true", help="do not run the models that load (by default each "
                    "runs once on a batch of ones: a model that loads but cannot compute is a finding)")
    ap.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        target = Target(args.target, Path(tmp), not args.no_forward)
        if args.engine == "atheris":
            run_atheris(target, args.execs, args.timeout, args.crashes, args.rss_limit_mb)
            return
        counts, found, seconds = run_mutate(target, args.execs, args.seed, args.timeout, args.crashes, 15.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{args.target}: {args.execs:,} execs in {seconds:.0f} s ({args.execs / seconds:,.0f}/s), "
          f"seed {args.seed}: "
          f"{counts['ok']:,} loaded, {counts['error']:,} typed errors, {len(found)} finding(s); "
          f"peak RSS {peak:.0f} MiB")
    for key, (name, tb) in found.items():
        print(f"\n--- {key} ({name})\n{tb}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
