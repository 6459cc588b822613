"""`smallify quantize MODEL_DIR_OR_GGUF ...` on bad input, and a killed run that resumes.

Every refusal keeps the contract of tests/test_bad_input.py: exit status 2, exactly one line on stderr starting
'smallify: error:' that names the problem, no traceback, nothing written beside the output (no OUT, no
OUT.partial, no temporary file) and every input byte-for-byte as it was. The resume test kills a real
``python -m smallify.cli quantize`` process (SIGKILL) after its first finished block, runs the same command
again and checks that it skipped the finished blocks and wrote the same model as an uninterrupted run."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from smallify.cli import app
from smallify.llm.text import default_texts

runner = CliRunner()
CALIB = "\n\n".join(default_texts()[200:400])


# ---------------------------------------------------------------------------------------------- helpers

def digest(path) -> str:
    """sha256 of a file, or of every file of a folder (names and bytes)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


def listing(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


def assert_refused(args, *fragments, inputs=(), out_dir) -> str:
    """`smallify quantize ARGS`: exit 2, one stderr line naming the problem, nothing left in ``out_dir``, every
    path in ``inputs`` (files or folders) unchanged. Returns the line."""
    hashes = {str(p): digest(p) for p in inputs}
    before = listing(out_dir)
    r = runner.invoke(app, ["quantize", *map(str, args)])
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)         # no exception escaped
    err = r.stderr.strip()
    assert err.startswith("smallify: error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in r.output and "wrote" not in r.stdout
    for f in fragments:
        assert f in err, err
    assert listing(out_dir) == before, f"left behind: {set(listing(out_dir)) - set(before)}"
    assert {str(p): digest(p) for p in inputs} == hashes, "an input was changed"
    return err


def save_llama(folder: Path, tokenizer, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_gguf(path: Path, arch: str) -> Path:
    """A small well-formed GGUF of architecture ``arch`` (a few keys, two tensors, no tokenizer)."""
    import numpy as np

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((400, 64), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory, bpe_tokenizer):
    """A 400-token byte-level BPE trained in memory; tiny random Llamas of 2 and 6 blocks saved with it as HF
    folders; calibration text; a BERT encoder folder; GGUF files (arch 'foo', arch 'llama', not a GGUF)."""
    from transformers import BertConfig, BertModel

    tokenizer = bpe_tokenizer
    root = tmp_path_factory.mktemp("llm_bad")
    save_llama(root / "model", tokenizer, layers=2)
    save_llama(root / "deep", tokenizer, layers=6)
    (root / "calib.txt").write_text(CALIB, encoding="utf-8")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(root / "bert")
    write_gguf(root / "foo.gguf", "foo")
    write_gguf(root / "llama.gguf", "llama")
    (root / "text.gguf").write_text("not a GGUF file at all\n")
    return root, tokenizer


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------------------------- models

def test_folder_that_is_not_a_causal_lm(root, out_dir):
    r, _ = root
    line = assert_refused([r / "bert", "--method", "rtn", "--out", out_dir / "q"], "BertModel",
                          "not a causal language model", inputs=[r / "bert"], out_dir=out_dir)
    assert "bert model" in line


def test_gguf_that_transformers_cannot_read(root, out_dir):
    r, _ = root
    assert_refused([r / "foo.gguf", "--method", "rtn", "--out", out_dir / "q"], "foo.gguf",
                   "transformers cannot read this GGUF", "foo", inputs=[r / "foo.gguf"], out_dir=out_dir)


def test_gguf_suffix_on_a_file_that_is_not_gguf(root, out_dir):
    r, _ = root
    assert_refused([r / "text.gguf", "--method", "rtn", "--out", out_dir / "q"], "is not a GGUF file",
                   "b'not '", inputs=[r / "text.gguf"], out_dir=out_dir)


# ---------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("extra,fragments", [
    (["--bits", "3"], ["--bits 3 --group-size 64 --asym has no exact GGUF block type", "accepted:"]),
    (["--group-size", "48"], ["--bits 4 --group-size 48 --asym has no exact GGUF block type"]),
    (["--bits", "8", "--asym"], ["--bits 8 --group-size 64 --asym has no exact GGUF block type"]),
    (["--group-size", "none"], ["--group-size None"]),
])
def test_grid_without_gguf_block_type(root, out_dir, extra, fragments):
    """Refused before the model is read (the input GGUF holds no loadable model: loading it would fail)."""
    r, _ = root
    assert_refused([r / "llama.gguf", "--method", "rtn", *extra, "--format", "gguf", "--out", out_dir / "q.gguf"],
                   *fragments, inputs=[r / "llama.gguf"], out_dir=out_dir)


# ---------------------------------------------------------------------------------------------- calibration

def test_calibration_text_shorter_than_samples_x_seq_len(root, out_dir):
    r, tokenizer = root
    text = "\n\n".join(default_texts()[200:203])
    calib = out_dir.parent / "short.txt"
    calib.write_text(text, encoding="utf-8")
    have = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert have < 8 * 64
    assert_refused([r / "model", "--method", "gptq", "--calib", calib, "--samples", 8, "--seq-len", 64,
                    "--out", out_dir / "q"], f"calibration needs {8 * 64} tokens (8 samples x seq_len 64)",
                   f"the text has {have}", inputs=[calib, r / "model"], out_dir=out_dir)


@pytest.mark.parametrize("name,content,fragments", [
    ("missing.txt", None, ["missing.txt: no such file"]),
    ("empty.txt", "", ["empty.txt is empty"]),
    ("blank.txt", " \n\n\t\n", ["blank.txt is empty"]),
    ("latin1.txt", "caf\u00e9 au lait, " * 50, ["latin1.txt is not UTF-8 text (byte 3: b'\\xe9')"]),
    ("prompts.jsonl", '{"text": "fine"}\n{"prompt": "no text here"}\n', ['prompts.jsonl line 2 has no "text" string',
                                                                         "keys ['prompt']"]),
    ("broken.jsonl", '{"text": "fine"}\n{"text": \n', ["broken.jsonl line 2 is not JSON"]),
    ("data.csv", "text\nhello\n", ["text files ending '.csv' are not read"]),
])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_bad_calibration_file(root, out_dir, tmp_path, method, name, content, fragments):
    r, _ = root
    calib = tmp_path / name
    if content is not None:
        calib.write_bytes(content.encode("latin-1") if name == "latin1.txt" else content.encode("utf-8"))
    assert_refused([r / "model", "--method", method, "--calib", calib, "--out", out_dir / "q"], *fragments,
                   inputs=[r / "model"] + ([calib] if calib.exists() else []), out_dir=out_dir)


# ---------------------------------------------------------------------------------------------- output paths

@pytest.mark.parametrize("fmt,name", [("hf", "q"), ("smallify", "q.smallify"), ("gguf", "q.gguf")])
def test_existing_output_refused_unless_force(root, out_dir, fmt, name):
    """A non-empty folder (hf) or an existing file (gguf, smallify) is refused before any work, untouched."""
    r, _ = root
    out = out_dir / name
    if fmt == "hf":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        out.write_text("mine")
    source = r / ("llama.gguf" if fmt == "gguf" else "model")
    assert_refused([source, "--method", "rtn", "--format", fmt, "--out", out], "--force",
                   inputs=[source, out], out_dir=out_dir)


@pytest.mark.parametrize("fmt,target", [("hf", "input"), ("hf", "parent"), ("smallify", "input"),
                                        ("gguf", "input")])
def test_output_that_is_or_holds_the_input_is_refused_even_with_force(root, tmp_path, fmt, target):
    """--force replaces the output: never when the output is the input, or a folder holding it."""
    _, tokenizer = root
    holder = tmp_path / "holder"
    holder.mkdir()
    if fmt == "gguf":
        source = write_gguf(holder / "llama.gguf", "llama")
    else:
        source = save_llama(holder / "model", tokenizer, layers=2)
    out = source if target == "input" else holder
    assert_refused([source, "--method", "rtn", "--format", fmt, "--out", out, "--force"], "is the input",
                   inputs=[holder], out_dir=holder)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_output_folder_that_does_not_exist_is_refused_before_work(root, out_dir, method):
    r, _ = root
    assert_refused([r / "model", "--method", method, "--calib", r / "calib.txt", "--samples", 2, "--seq-len", 8,
                    "--out", out_dir / "missing" / "q"], "folder", "does not exist", inputs=[r / "model"],
                   out_dir=out_dir)


def test_output_path_that_is_a_file_for_hf_or_a_folder_for_a_file_format(root, out_dir):
    r, _ = root
    (out_dir / "q").write_text("mine")
    assert_refused([r / "model", "--method", "rtn", "--out", out_dir / "q", "--force"], "is a file",
                   inputs=[out_dir / "q"], out_dir=out_dir)
    (out_dir / "d.smallify").mkdir()
    assert_refused([r / "model", "--method", "rtn", "--format", "smallify", "--out", out_dir / "d.smallify",
                    "--force"], "is a folder", inputs=[out_dir / "d.smallify"], out_dir=out_dir)


# ---------------------------------------------------------------------------------------------- interrupted run

def quantize_args(source: Path, calib: Path, out: Path) -> list[str]:
    return ["quantize", str(source), "--method", "gptq", "--samples", "8", "--seq-len", "32", "--calib", str(calib),
            "--out", str(out)]


def logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.slow             # two processes importing torch + transformers, 6 GPTQ blocks of ~1 s: ~30 s
def test_killed_run_resumes_after_the_last_finished_block(root, tmp_path):
    r, _ = root
    out = tmp_path / "q"
    partial = tmp_path / "q.partial"
    cmd = [sys.executable, "-m", "smallify.cli", *quantize_args(r / "deep", r / "calib.txt", out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    progress = partial / "progress.json"

    def done() -> int:
        try:
            return int(json.loads(progress.read_text())["done"])
        except (OSError, ValueError, KeyError):    # not written yet
            return 0

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while done() < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    killed_at = done()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-500:]}"
    assert 1 <= killed_at < 6 and not out.exists()
    first = (partial / "block_0000.safetensors").stat()

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = set()
    while proc.poll() is None:                     # the finished blocks are read, never written again
        try:
            seen.add((partial / "block_0000.safetensors").stat().st_ino)
            seen.add(-done() if done() < killed_at else 0)
        except FileNotFoundError:                  # removed at the end
            pass
        time.sleep(0.01)
    stdout, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-1000:]
    assert "wrote" in stdout.decode()
    assert seen <= {first.st_ino, 0}, "the resumed run quantized the finished blocks again"
    assert out.is_dir() and not partial.exists()

    ref = tmp_path / "ref"
    res = runner.invoke(app, quantize_args(r / "deep", r / "calib.txt", ref))
    assert res.exit_code == 0, res.output
    assert torch.equal(logits(out), logits(ref))             # the same model, bit for bit


def test_kill_between_the_hidden_states_and_progress_json_resumes_the_same(root, tmp_path, monkeypatch):
    """The worst moment to die: block 1's files are written, progress.json still says 1 block done."""
    import smallify as sm
    from smallify import files
    from smallify.llm import GPTQ

    r, tokenizer = root
    config, data = GPTQ(bits=4, group_size=32, samples=4, seq_len=32), [CALIB]

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(r / "model").eval()

    ref = sm.quantize(load(), config, data=data, tokenizer=tokenizer, progress=False)
    write_atomic, seen = files.write_atomic, []

    def dies_at_second_progress(path, write, inputs=()):
        if Path(path).name == "progress.json":
            seen.append(path)
            if len(seen) == 2:
                raise KeyboardInterrupt("killed")
        return write_atomic(path, write, inputs)

    monkeypatch.setattr(files, "write_atomic", dies_at_second_progress)
    with pytest.raises(KeyboardInterrupt):
        sm.quantize(load(), config, data=data, tokenizer=tokenizer, progress=False, checkpoint=tmp_path / "ck")
    monkeypatch.setattr(files, "write_atomic", write_atomic)
    assert json.loads((tmp_path / "ck" / "progress.json").read_text())["done"] == 1
    resumed = sm.quantize(load(), config, data=data, tokenizer=tokenizer, progress=False, checkpoint=tmp_path / "ck")
    x = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(resumed(x).logits, ref(x).logits)
