"""Channel pruning of Hugging Face models torch.fx cannot trace (BERT, GPT-2, Llama built offline from tiny
configs): the dependency graph comes from torch.export. Every FFN's neurons are found and pruned (Llama's
gate and up together), attention and the residual width stay, each with its reason; the pruned model equals
the original with the pruned neurons zeroed (a masked reference), runs generate(), has a config that builds
its shapes, and round-trips the container."""
import copy

import pytest
import torch

import smallify as sm

transformers = pytest.importorskip("transformers")

# name -> (class, config kwargs, FFN layers: (producers, reader), reader stores its weight [in, out], output key)
MODELS = {
    "bert": (lambda: transformers.BertModel, dict(vocab_size=200, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=128, max_position_embeddings=64), "BertConfig",
             [(["encoder.layer.{i}.intermediate.dense"], "encoder.layer.{i}.output.dense")], False,
             "last_hidden_state"),
    "gpt2": (lambda: transformers.GPT2LMHeadModel, dict(n_layer=2, n_embd=64, n_head=4, vocab_size=200,
             n_positions=32, bos_token_id=0, eos_token_id=0), "GPT2Config",
             [(["transformer.h.{i}.mlp.c_fc"], "transformer.h.{i}.mlp.c_proj")], True, "logits"),
    "llama": (lambda: transformers.LlamaForCausalLM, dict(vocab_size=200, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=0), "LlamaConfig",
              [(["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"], "model.layers.{i}.mlp.down_proj")],
              False, "logits"),
}
FFN = {"bert": 128, "gpt2": 256, "llama": 128}


def build(name):
    cls, kwargs, cfg_name, *_ = MODELS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**kwargs)
    return cls()(cfg).eval(), cfg


@pytest.fixture(scope="module", params=list(MODELS))
def pruned(request):
    name = request.param
    model, cfg = build(name)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    return name, model, cfg, sm.prune(model, sm.ChannelPrune(ratio=0.5), ids)


def _kept(orig: torch.Tensor, new: torch.Tensor) -> list[int]:
    """Which of ``orig``'s rows ``new``'s rows are (exact copies, in order)."""
    return [int((orig == row).all(1).nonzero()[0]) for row in new]


def masked_reference(name, model, small):
    """The original model with every pruned FFN neuron's input column of the reader zeroed."""
    ref = copy.deepcopy(model)
    (_, reader), transposed = MODELS[name][3][0], MODELS[name][4]
    for i in range(2):
        orig_w, new_w = ref.get_submodule(reader.format(i=i)).weight, small.get_submodule(reader.format(i=i)).weight
        rows = (lambda w: w) if transposed else (lambda w: w.t())         # one row per FFN neuron
        kept = _kept(rows(orig_w), rows(new_w))
        assert len(kept) == FFN[name] // 2 and kept == sorted(kept)
        with torch.no_grad():
            rows(orig_w)[[j for j in range(FFN[name]) if j not in kept]] = 0
    return ref


def test_ffn_neurons_are_found_and_the_rest_is_frozen_with_its_reason(pruned):
    name, model, cfg, small = pruned
    rep = small.report
    (producers, reader), = MODELS[name][3]
    changed = [g for g in rep.groups if g.get("after") is not None and g["after"] < g["before"]]
    assert [(g["producers"], g["before"], g["after"]) for g in changed] == \
        [([p.format(i=i) for p in producers], FFN[name], FFN[name] // 2) for i in range(2)]
    frozen = {tuple(g["producers"]): g["frozen"] for g in rep.groups if "frozen" in g}
    residual = next(r for p, r in frozen.items() if reader.format(i=0) in p)         # the FFN's output: residual
    assert "embedding" in residual
    attention = [r for p, r in frozen.items()
                 if any(q.endswith(("c_attn", "query", "key", "value", "q_proj", "k_proj", "v_proj")) for q in p)]
    assert attention and all("view" in r or "split" in r for r in attention)        # heads: reshaped, frozen
    assert rep.macs_after < rep.macs_before and rep.params_after < rep.params_before
    ffn_params = 2 * 64 * FFN[name] // 2 * (3 if name == "llama" else 2)              # 2 layers, half of each FFN
    assert rep.params_before - rep.params_after == ffn_params + (2 * FFN[name] // 2 if name != "llama" else 0)


def test_pruned_equals_the_masked_reference(pruned):
    name, model, cfg, small = pruned
    ref = masked_reference(name, model, small)
    key = MODELS[name][5]
    x = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want, full = small(x)[key], ref(x)[key], model(x)[key]
    assert (got - want).abs().max() < 2e-5, (got - want).abs().max()                 # measured ~1e-6
    assert (got - full).abs().max() > 1e-3                                           # the pruning did change it


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


def test_config_builds_the_pruned_shapes(pruned):
    name, model, cfg, small = pruned
    assert "config." in str(small.report)
    rebuilt = MODELS[name][0]()(small.config).eval()
    rebuilt.load_state_dict(small.state_dict())                 # strict: every shape agrees
    x = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[MODELS[name][5]], small(x)[MODELS[name][5]])


def test_container_round_trip_into_a_factory_model(pruned, tmp_path):
    name, model, cfg, small = pruned
    sm.save(small, tmp_path / "p.smallify")
    factory, _ = build(name)                                    # the original config: fit_shapes resizes it
    back = sm.load(tmp_path / "p.smallify", factory)
    x = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        assert torch.equal(back(x)[MODELS[name][5]], small(x)[MODELS[name][5]])


def test_uneven_widths_keep_the_config_and_say_why():
    model, cfg = build("llama")
    ids = torch.randint(0, 200, (2, 12))
    small = sm.prune(model, sm.ChannelPrune(ratio=0.5, layer_ratios={"model.layers.0.*": 0.25}), ids)
    widths = [small.get_submodule(f"model.layers.{i}.mlp.up_proj").out_features for i in range(2)]
    assert widths == [96, 64] and small.config.intermediate_size == 128
    assert "FFN widths differ" in str(small.report)
