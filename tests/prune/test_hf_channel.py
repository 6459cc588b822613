"""Channel pruning of Hugging Face models torch.fx cannot trace (BERT, GPT-2, Llama built offline from tiny
configs): the dependency graph comes from torch.export. Every FFN's neurons are found and pruned (Llama's
gate and up together), and whole attention heads (Llama: a key/value group with its query heads); the
residual width stays, with its reason. GPT-2's c_attn (q, k, v split by a size its attention module holds)
loses the same heads in all three parts.
The pruned model equals the original with the pruned neurons and heads zeroed (a masked reference), runs
generate(), has a config that builds its shapes where the config can say them, and round-trips the
container."""
import copy

import pytest
import torch

import smallify as sm

transformers = pytest.importorskip("transformers")

L = "{i}"
# name -> class, config, FFN producers, FFN reader, attention producers, attention reader, reader stored [in, out],
# output key, FFN width, channels per head (a Llama group: 2 query heads of 16)
MODELS = {
    "bert": dict(cls=lambda: transformers.BertModel, config=lambda: transformers.BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64),
        ffn=["encoder.layer.{i}.intermediate.dense"], ffn_reader="encoder.layer.{i}.output.dense",
        attn=["encoder.layer.{i}.attention.self." + k for k in ("query", "key", "value")],
        attn_reader="encoder.layer.{i}.attention.output.dense", transposed=False, key="last_hidden_state",
        width=128, head=16, heads=4),
    "gpt2": dict(cls=lambda: transformers.GPT2LMHeadModel, config=lambda: transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=200, n_positions=32, bos_token_id=0, eos_token_id=0),
        ffn=["transformer.h.{i}.mlp.c_fc"], ffn_reader="transformer.h.{i}.mlp.c_proj",
        attn=["transformer.h.{i}.attn.c_attn"], attn_reader="transformer.h.{i}.attn.c_proj", transposed=True,
        key="logits", width=256, head=16, heads=4),
    "llama": dict(cls=lambda: transformers.LlamaForCausalLM, config=lambda: transformers.LlamaConfig(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0),
        ffn=["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"],
        ffn_reader="model.layers.{i}.mlp.down_proj",
        attn=["model.layers.{i}.self_attn." + k for k in ("q_proj", "k_proj", "v_proj")],
        attn_reader="model.layers.{i}.self_attn.o_proj", transposed=False, key="logits", width=128, head=32,
        heads=2),
}


def build(name):
    torch.manual_seed(0)
    cfg = MODELS[name]["config"]()
    return MODELS[name]["cls"]()(cfg).eval(), cfg


@pytest.fixture(scope="module", params=list(MODELS))
def pruned(request):
    name = request.param
    model, cfg = build(name)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    return name, model, cfg, sm.prune(model, sm.ChannelPrune(ratio=0.5), ids)


def _kept(orig: torch.Tensor, new: torch.Tensor) -> list[int]:
    """Which of ``orig``'s rows ``new``'s rows are (exact copies)."""
    return [int((orig == row).all(1).nonzero()[0]) for row in new]


def masked_reference(name, model, small):
    """The original model with the input features of every FFN reader and attention output projection that
    the pruned model lost set to zero (their columns in the reader): the same function, unpruned."""
    spec, ref = MODELS[name], copy.deepcopy(model)
    rows = (lambda w: w) if spec["transposed"] else (lambda w: w.t())            # one row per input feature
    for reader, width, block in ((spec["ffn_reader"], spec["width"], 1), (spec["attn_reader"], 64, spec["head"])):
        for i in range(2 if reader else 0):
            orig_w, new_w = ref.get_submodule(reader.format(i=i)).weight, small.get_submodule(reader.format(i=i)).weight
            kept = _kept(rows(orig_w), rows(new_w))
            assert len(kept) == width // 2 and kept == sorted(kept)
            assert all(kept[j] % block == 0 for j in range(0, len(kept), block))       # whole heads
            with torch.no_grad():
                rows(orig_w)[[j for j in range(width) if j not in kept]] = 0
    return ref


def test_ffn_neurons_and_heads_are_found_and_the_residual_is_frozen(pruned):
    name, model, cfg, small = pruned
    spec, rep = MODELS[name], small.report
    changed = [(g["producers"], g["before"], g["after"]) for g in rep.groups
               if g.get("after") is not None and g["after"] < g["before"]]
    want = []
    for i in range(2):
        if spec["attn"]:
            want.append(([p.format(i=i) for p in spec["attn"]], spec["heads"], spec["heads"] // 2))
        want.append(([p.format(i=i) for p in spec["ffn"]], spec["width"], spec["width"] // 2))
    assert changed == want
    rows = {"bert": "16", "gpt2": "16", "llama": "32/16"}[name]             # Llama: 2 query heads, 1 key/value head
    assert f"{spec['heads']} -> {spec['heads'] // 2} channels (heads: {rows} rows each)" in str(rep)
    frozen = {tuple(g["producers"]): g["frozen"] for g in rep.groups if "frozen" in g}
    residual = next(r for p, r in frozen.items() if spec["ffn_reader"].format(i=0) in p)   # the FFN's output
    assert "embedding" in residual
    assert rep.macs_after < rep.macs_before and rep.params_after < rep.params_before


def test_pruned_equals_the_masked_reference(pruned):
    name, model, cfg, small = pruned
    ref, key = masked_reference(name, model, small), MODELS[name]["key"]
    x = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want, full = small(x)[key], ref(x)[key], model(x)[key]
    assert (got - want).abs().max() < 2e-5, (got - want).abs().max()                 # measured <= 2e-7
    assert (got - full).abs().max() > 1e-2                                           # the pruning did change it


def test_causal_lms_generate_as_the_masked_reference(pruned):
    name, model, cfg, small = pruned
    if name == "bert":
        pytest.skip("an encoder")
    ref = masked_reference(name, model, small)
    x = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = small.generate(x, max_new_tokens=6, do_sample=False)
        want = ref.generate(x, max_new_tokens=6, do_sample=False)
    assert got.shape == (2, 12) and torch.equal(got, want)


def _rebuilds_from_config(name, small):
    rebuilt = MODELS[name]["cls"]()(small.config).eval()
    rebuilt.load_state_dict(small.state_dict())                 # strict: every shape agrees
    x = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[MODELS[name]["key"]], small(x)[MODELS[name]["key"]])


def test_config_builds_the_pruned_shapes(pruned):
    name, model, cfg, small = pruned
    text = str(small.report)
    if name != "llama":                 # BERT's and GPT-2's configs derive the head size from the head count
        attr = "n_head" if name == "gpt2" else "num_attention_heads"
        assert f"config.{attr} stays 4: the config derives the head size from it" in text
        return
    _rebuilds_from_config(name, small)
    assert ("config.num_attention_heads: 4 -> 2" in text and "config.num_key_value_heads: 2 -> 1" in text) \
        == (name == "llama")


@pytest.mark.parametrize("name,pattern", [("bert", "*.attention.self.*"), ("gpt2", "*.attn.c_attn")])
def test_with_attention_ignored_the_config_rebuilds_the_model(name, pattern):
    model, cfg = build(name)
    small = sm.prune(model, sm.ChannelPrune(ratio=0.5, ignore=(pattern,)), torch.randint(0, 200, (2, 12)))
    attn = small.get_submodule(MODELS[name]["attn"][0].format(i=0))
    assert attn.weight.shape[-1 if name == "gpt2" else 0] == (192 if name == "gpt2" else 64)     # heads kept
    _rebuilds_from_config(name, small)


def test_container_round_trip_into_a_factory_model(pruned, tmp_path):
    name, model, cfg, small = pruned
    sm.save(small, tmp_path / "p.smallify")
    factory, _ = build(name)                                    # the original config: fit_shapes resizes it
    back = sm.load(tmp_path / "p.smallify", factory)
    x = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        assert torch.equal(back(x)[MODELS[name]["key"]], small(x)[MODELS[name]["key"]])


def test_uneven_widths_keep_the_config_and_say_why():
    model, cfg = build("llama")
    small = sm.prune(model, sm.ChannelPrune(ratio=0.5, layer_ratios={"model.layers.0.*": 0.25}),
                     torch.randint(0, 200, (2, 12)))
    widths = [small.get_submodule(f"model.layers.{i}.mlp.up_proj").out_features for i in range(2)]
    assert widths == [96, 64] and small.config.intermediate_size == 128
    assert "FFN widths differ" in str(small.report)


def test_pruned_then_quantized_round_trips_the_container(pruned, tmp_path):
    name, model, cfg, small = pruned
    q = sm.quantize(small, sm.Int8Static(), torch.randint(0, 200, (16, 12)), progress=False)
    sm.save(q, tmp_path / "pq.smallify")
    back = sm.load(tmp_path / "pq.smallify", build(name)[0])      # twins swapped in, then shapes fitted
    x, key = torch.randint(0, 200, (2, 8)), MODELS[name]["key"]
    with torch.no_grad():
        assert torch.equal(back(x)[key], q(x)[key])


@pytest.mark.parametrize("name", list(MODELS))
def test_reconstruction_refits_the_readers_of_pruned_features(name):
    """Least squares on the layers that read pruned FFN neurons and heads (GPT-2's Conv1D too, stored [in, out])
    brings the output closer to the unpruned model's on held-out inputs."""
    model, cfg = build(name)
    g = torch.Generator().manual_seed(4)
    data = [torch.randint(0, 200, (8, 12), generator=g) for _ in range(4)]
    test, key = torch.randint(0, 200, (8, 12), generator=g), MODELS[name]["key"]
    errors = []
    for reconstruct in (False, True):
        small = sm.prune(model, sm.ChannelPrune(ratio=0.5, reconstruct=reconstruct), data[0], data=data)
        with torch.no_grad():
            errors.append((small(test)[key] - model(test)[key]).pow(2).mean().item())
    assert errors[1] < 0.8 * errors[0], errors            # measured: 0.10x BERT, 0.14x GPT-2, 0.64x Llama


def test_a_tokenizer_style_dict_is_example_inputs():
    model, cfg = build("bert")
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0                                                  # padding: the mask reaches attention
    small = sm.prune(model, sm.ChannelPrune(ratio=0.5), {"input_ids": ids, "attention_mask": mask})
    assert small.report.macs_after < 0.55 * small.report.macs_before
    ref = masked_reference("bert", model, small)
    with torch.no_grad():
        got, want = small(ids, mask).last_hidden_state, ref(ids, mask).last_hidden_state
    assert (got - want).abs().max() < 2e-5


def test_llama_with_sdpa_enable_gqa_prunes_key_value_groups(monkeypatch):
    """Where transformers hands grouped-query attention to sdpa (enable_gqa=True, no repeat_kv in the graph),
    a key/value head still goes with its query heads."""
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    model, cfg = build("llama")
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(6))
    small = sm.prune(model, sm.ChannelPrune(ratio=0.5), ids)
    assert "2 -> 1 channels (heads: 32/16 rows each)" in str(small.report)
    ref = masked_reference("llama", model, small)
    with torch.no_grad():
        assert (small(ids).logits - ref(ids).logits).abs().max() < 2e-5


def test_taylor_on_a_causal_lm_scores_conv1d_neurons_by_their_columns():
    """importance='taylor' with next-token labels: GPT-2's FFN neurons (columns of c_fc's [in, out] weight)
    kept are the top half of |sum(w * dL/dw)| per column, computed here independently."""
    model, cfg = build("gpt2")
    g = torch.Generator().manual_seed(7)
    data = [(ids := torch.randint(0, 200, (8, 12), generator=g), ids.roll(-1, 1)) for _ in range(2)]
    small = sm.prune(model, sm.ChannelPrune(ratio=0.5, importance="taylor"), data[0][0], data=data)
    ref = copy.deepcopy(model)
    for x, y in data:
        torch.nn.functional.cross_entropy(ref(x).logits.flatten(0, 1), y.flatten()).backward()
    fc = ref.transformer.h[0].mlp.c_fc
    want = torch.sort(torch.topk((fc.weight * fc.weight.grad).sum(0).abs(), 128).indices).values.tolist()
    assert _kept(fc.weight.detach().t(), small.transformer.h[0].mlp.c_fc.weight.t()) == want
