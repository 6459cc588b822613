"""`smallify quantize MODEL_DIR --method gptq ...`: a Hugging Face folder in, a folder that transformers loads
out (equal to the in-process result), and every refusal before any work: exit 2, one line, nothing written."""
import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

import smallify as sm
from smallify.cli import app
from smallify.llm import GPTQ
from smallify.llm.text import default_texts

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bpe_tokenizer):
    """A tiny random Llama with a 400-token byte-level BPE trained in memory, saved as a HF folder, and a
    calibration text file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    root = tmp_path_factory.mktemp("llm")
    model.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    (root / "calib.txt").write_text("\n\n".join(default_texts()[200:400]), encoding="utf-8")
    return root, model, tokenizer


def cli(*args):
    return runner.invoke(app, ["quantize", *map(str, args)])


def test_gptq_folder_loads_in_transformers_and_equals_the_api(folder, tmp_path):
    root, model, tokenizer = folder
    out = tmp_path / "q"
    r = cli(root / "model", "--method", "gptq", "--calib", root / "calib.txt", "--samples", 4, "--seq-len", 32,
            "--group-size", 32, "--out", out)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and not (tmp_path / "q.partial").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref = sm.quantize(transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval(),
                      GPTQ(bits=4, group_size=32, samples=4, seq_len=32),
                      data=[(root / "calib.txt").read_text()], tokenizer=tokenizer, progress=False)
    x = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, ref(x).logits, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--method", "gptq"], "calibrates on text: give --calib"),
    (["--method", "kmeans"], "does not apply to a language model"),
    (["--method", "rtn", "--format", "gguf"], "--format gguf needs a .gguf input"),
    (["--method", "rtn", "--format", "onnx"], "--format 'onnx' is not supported"),
    (["--method", "rtn", "--bits", "9"], "bits=9 is not supported"),
])
def test_refusals_before_any_work(folder, tmp_path, args, message):
    root, _, _ = folder
    out = tmp_path / "q"
    r = cli(root / "model", *args, "--out", out)
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_existing_output_folder_is_refused_unless_force(folder, tmp_path):
    root, _, _ = folder
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli(root / "model", "--method", "rtn", "--out", out)
    assert r.exit_code == 2 and "is not an empty folder; pass --force" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = cli(root / "model", "--method", "rtn", "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_smallify_format_round_trips(folder, tmp_path):
    root, model, _ = folder
    out = tmp_path / "q.smallify"
    r = cli(root / "model", "--method", "datafree", "--bits", 3, "--group-size", 32, "--format", "smallify",
            "--out", out)
    assert r.exit_code == 0, r.output
    back = sm.load(out, transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval())
    ref = sm.quantize(transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval(),
                      sm.llm.DataFree(bits=3, group_size=32), progress=False)
    x = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(x).logits)
