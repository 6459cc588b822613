"""The LLM weight-only methods: grid math against closed forms, GPTQ and AWQ against their definitions, and
the block-by-block pipeline on tiny random Llama / GPT-2 / Qwen2 / Mistral built offline from configs."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import smallify as sm
from smallify.errors import ConfigError, DataError
from smallify.llm import AWQ, GPTQ, RTN, DataFree, grid
from smallify.llm import awq as awq_math
from smallify.llm import quantize as llm_quantize
from smallify.llm.blocks import (
    capture,
    decoder_blocks,
    linear_layers,
    run_block,
    weight_view,
)
from smallify.llm.config import grid_format
from smallify.llm.gptq import gptq, minmax_fit, search_fit
from smallify.quant.primitives import sqnr_db

VOCAB = 300


def tiny(kind: str, **over):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    common.update(over)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0))
    return model.eval()


def ids(n, t=64, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ---- grid math -----------------------------------------------------------------------------------------------

def test_range_params_closed_form():
    lo, hi = torch.tensor([[-1.0, -0.5]]), torch.tensor([[3.0, 0.25]])
    s, z = grid.range_params(lo, hi, grid_format(4, False))
    assert torch.allclose(s, torch.tensor([[4.0 / 15, 0.75 / 15]]))
    assert z.tolist() == [[round(1.0 / (4.0 / 15)), round(0.5 / (0.75 / 15))]]
    s, z = grid.range_params(lo, hi, grid_format(4, True))
    assert torch.allclose(s, torch.tensor([[3.0 / 7, 0.5 / 7]])) and z.abs().sum() == 0


def test_search_never_worse_than_minmax_and_refits_help():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[0, 0] = 8.0                         # an outlier: min-max wastes the grid on it
    fmt = grid_format(3, False)
    errors = {}
    for name, (s, z) in {"minmax": grid.minmax(w, fmt, 32), "search": grid.search(w, fmt, 32, refits=0),
                         "refits": grid.search(w, fmt, 32, refits=4)}.items():
        d = grid.groups_of(w - grid.dequantize(grid.integers(w, s, z, fmt, 32), s, z, 32), 32)
        errors[name] = d.pow(2).sum(-1)
    assert (errors["search"] <= errors["minmax"] + 1e-7).all()
    assert (errors["refits"] <= errors["search"] + 1e-7).all()
    # measured: 143.9 vs 166.3 (-13 %) on this seed
    assert errors["refits"].sum() < 0.9 * errors["minmax"].sum()


def test_integers_stay_on_the_grid_and_dequantize_exactly():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for sym in (False, True):
        fmt = grid_format(4, sym)
        s, z = grid.minmax(w, fmt, 16)
        q = grid.integers(w, s, z, fmt, 16)
        assert q.min() >= fmt.qmin and q.max() <= fmt.qmax
        deq = grid.dequantize(q, s, z, 16)
        assert torch.equal(grid.integers(deq, s, z, fmt, 16), q)       # dequantized weights re-round to q


# ---- GPTQ -------------------------------------------------------------------------------------------------

def correlated(n=2048, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.1 + torch.eye(cols)
    return (torch.randn(n, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3)


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    fmt = grid_format(4, False)
    q, s, z = gptq(w, torch.eye(128) * 5.0, fmt, 32, minmax_fit(fmt), act_order=False, damp=0.01)
    s_ref, z_ref = grid.minmax(w, fmt, 32)
    assert torch.allclose(s, s_ref) and torch.equal(z, z_ref)
    assert torch.equal(q, grid.integers(w, s_ref, z_ref, fmt, 32))


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_cuts_the_output_error_of_round_to_nearest(sym):
    x = correlated()
    torch.manual_seed(1)
    w = torch.randn(128, 256) * 0.05
    fmt = grid_format(4, sym)
    s, z = grid.minmax(w, fmt, 64)
    rtn = grid.dequantize(grid.integers(w, s, z, fmt, 64), s, z, 64)
    q, s, z = gptq(w, x.T @ x, fmt, 64, search_fit(fmt))
    out = grid.dequantize(q, s, z, 64)
    assert q.min() >= fmt.qmin and q.max() <= fmt.qmax
    err = lambda wq: float((x @ (w - wq).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    # measured 0.0028 vs 0.0082 (asym), 0.0032 vs 0.0115 (sym): GPTQ at least halves RTN's output error
    assert err(out) < 0.5 * err(rtn)


# ---- AWQ --------------------------------------------------------------------------------------------------

def test_awq_scale_search_is_never_worse_than_no_scaling():
    x = correlated(cols=128)
    x[:, :4] *= 20                       # salient input channels
    torch.manual_seed(2)
    w = torch.randn(64, 128) * 0.05
    fmt = grid_format(3, False)

    def rtn(v):
        s, z = grid.minmax(v, fmt, 32)
        return grid.dequantize(grid.integers(v, s, z, fmt, 32), s, z, 32)

    h = x.T @ x
    s, alpha, err = awq_math.search_scale([w], h, x.abs().mean(0), rtn, 20)
    plain = float(awq_math.output_error(rtn(w) - w, h))
    assert err <= plain and alpha > 0 and err < 0.8 * plain     # the salient channels are protected


@pytest.mark.parametrize("kind,expected", [
    ("llama", {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "input_layernorm",
               ("self_attn.o_proj",): None,                       # GQA: 2 kv heads feed 4 query heads
               ("mlp.gate_proj", "mlp.up_proj"): "post_attention_layernorm", ("mlp.down_proj",): "mlp.up_proj"}),
    ("gpt2", {("attn.c_attn",): "ln_1", ("attn.c_proj",): None, ("mlp.c_fc",): "ln_2", ("mlp.c_proj",): None}),
])
def test_producers_are_found_by_probe_and_folding_keeps_the_output(kind, expected):
    model = tiny(kind)
    _, blocks = decoder_blocks(model)
    batches = capture(model, blocks, ids(4, 32), 4)
    groups = llm_quantize._collect(blocks[0], linear_layers(blocks[0]), batches)
    found = {tuple(m): awq_math.find_producer(blocks[0], m, batches[0]) for m, _, _ in groups}
    assert found == expected
    before = run_block(blocks[0], batches[0])
    for members, producer in found.items():
        if producer is not None:
            width = weight_view(blocks[0].get_submodule(members[0])).shape[1]
            awq_math.fold(blocks[0], producer, list(members), 0.5 + torch.rand(width))
    assert torch.allclose(run_block(blocks[0], batches[0]), before, rtol=1e-4, atol=1e-5)


# ---- the pipeline -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    model = tiny("llama")
    return model, logits(model, ids(4, seed=9))


def run(model, config, **kw):
    return sm.quantize(copy.deepcopy(model), config, data=ids(16), progress=False, **kw)


def test_every_method_quantizes_every_block_linear_and_beats_rtn(llama):
    model, ref = llama
    sqnr = {}
    for config in (RTN(bits=3, group_size=32), DataFree(bits=3, group_size=32), AWQ(bits=3, group_size=32, samples=16, seq_len=64),
                   GPTQ(bits=3, group_size=32, samples=16, seq_len=64),
                   GPTQ(bits=3, group_size=32, samples=16, seq_len=64, awq=True)):
        q = run(model, config)
        assert len(q.quant_report.quantized) == 14          # 7 Linears x 2 blocks; embeddings and head float
        assert set(q.quant_report.floating) == {"model.embed_tokens", "lm_head"}
        sqnr[(config.method, getattr(config, "awq", False))] = sqnr_db(ref, logits(q, ids(4, seed=9)))
    rtn = sqnr[("rtn", False)]
    # measured on this seed (logits SQNR, dB): rtn 10.9, datafree 12.1, awq 12.2, gptq 12.3, awq+gptq 12.4
    for key, value in sqnr.items():
        if key != ("rtn", False):
            assert value > rtn + 0.5, (key, sqnr)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "mistral"])
def test_other_families_without_an_architecture_list(kind):
    model = tiny(kind)
    ref = logits(model, ids(4, seed=9))
    q = run(model, GPTQ(bits=4, group_size=32, samples=16, seq_len=64, awq=True))
    n_linear = 4 if kind == "gpt2" else 7
    assert len(q.quant_report.quantized) == 2 * n_linear
    assert sqnr_db(ref, logits(q, ids(4, seed=9))) > 15      # measured 19-22 dB at 4-bit g32


def test_group_size_falls_back_to_the_largest_divisor_and_says_so():
    model = tiny("llama", hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    q = sm.quantize(model, RTN(bits=4, group_size=64), progress=False)
    reasons = {layer.name: layer.reason for layer in q.quant_report.layers if layer.status == "quantized"}
    assert "group 48" in reasons["model.layers.0.self_attn.q_proj"]
    assert "does not divide 96" in reasons["model.layers.0.self_attn.q_proj"]
    assert "group 40" in reasons["model.layers.0.mlp.down_proj"]
    assert q.model.layers[0].self_attn.q_proj.spec.group_size == 48


def test_tied_lm_head_is_kept_or_quantized_on_its_own_grid():
    model = tiny("llama", tie_word_embeddings=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    q = sm.quantize(copy.deepcopy(model), RTN(bits=4, group_size=32, lm_head=True, lm_head_bits=8), progress=False)
    head = q.get_output_embeddings()
    assert head.spec.fmt.bits == 8 and head.weight is not q.get_input_embeddings().weight
    assert torch.equal(q.get_input_embeddings().weight, emb)
    assert sqnr_db(emb, head.weight) > 35                  # 8-bit g32 of the shared table
    assert "untied" in {layer.name: layer.reason for layer in q.quant_report.layers}["lm_head"]


def test_save_load_round_trip_is_exact(llama, tmp_path):
    model, _ = llama
    q = run(model, GPTQ(bits=4, group_size=32, samples=16, seq_len=64, awq=True))
    path = sm.save(q, tmp_path / "q.smallify")
    back = sm.load(path, tiny("llama"))
    x = ids(2, seed=5)
    assert torch.equal(logits(q, x), logits(back, x))
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size < float_bytes


def test_a_killed_run_resumes_after_the_last_finished_block(llama, tmp_path, monkeypatch):
    model, _ = llama
    config = GPTQ(bits=4, group_size=32, samples=16, seq_len=64)
    whole = run(model, config)
    calls = {"n": 0}
    real = llm_quantize._gptq_group

    def dies_in_block_1(*args):
        if calls["n"] >= 4:                       # 4 groups per block: q/k/v, o, gate/up, down
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(llm_quantize, "_gptq_group", dies_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        run(model, config, checkpoint=tmp_path / "ck")
    monkeypatch.setattr(llm_quantize, "_gptq_group", real)
    assert '"done": 1' in (tmp_path / "ck" / "progress.json").read_text()
    resumed = run(model, config, checkpoint=tmp_path / "ck")
    x = ids(2, seed=5)
    assert torch.equal(logits(resumed, x), logits(whole, x))
    with pytest.raises(ConfigError, match="belongs to another model"):
        run(model, GPTQ(bits=3, group_size=32, samples=16, seq_len=64), checkpoint=tmp_path / "ck")


def test_data_driven_methods_need_text():
    with pytest.raises(DataError, match="calibrates on text"):
        sm.quantize(tiny("llama"), GPTQ(), progress=False)


@pytest.mark.parametrize("bad", [dict(bits=9), dict(group_size=1), dict(damp=0), dict(samples=0)])
def test_bad_configs_name_the_value(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        GPTQ(**bad)


def test_a_tied_head_is_stored_once_and_stays_tied(tmp_path):
    model = tiny("llama", tie_word_embeddings=True, vocab_size=4000)
    q = sm.quantize(copy.deepcopy(model), RTN(bits=4, group_size=32), progress=False)
    path = sm.save(q, tmp_path / "q.smallify")
    emb_bytes = 4000 * 128 * 4
    assert emb_bytes < path.stat().st_size < 1.5 * emb_bytes       # the 2 MB table once, not twice
    back = sm.load(path, tiny("llama", tie_word_embeddings=True, vocab_size=4000))
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(logits(q, x), logits(back, x))


def test_data_free_with_generated_text_runs_gptq_on_the_models_own_samples():
    model = tiny("llama", bos_token_id=1, eos_token_id=2)
    ref = logits(model, ids(4, seed=9))
    windows = llm_quantize.generate_windows(model, 3, 16)
    assert windows.shape == (3, 16) and torch.equal(windows, llm_quantize.generate_windows(model, 3, 16))
    plain = sm.quantize(copy.deepcopy(model), DataFree(bits=3, group_size=32), progress=False)
    gen = sm.quantize(copy.deepcopy(model), DataFree(bits=3, group_size=32, generated=8, seq_len=64), progress=False)
    assert "GPTQ on 8 generated windows" in str(gen.quant_report)
    assert isinstance(gen.quant_config, DataFree)
    # measured 12.2 dB vs 11.8 dB (weight-only search) on this seed
    assert sqnr_db(ref, logits(gen, ids(4, seed=9))) > sqnr_db(ref, logits(plain, ids(4, seed=9)))
