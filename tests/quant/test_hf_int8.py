"""Int8Static on the PyTorch path for Hugging Face BERT and Llama built offline from tiny configs: torch.fx
cannot trace them, so each Linear's twin quantizes its own input (the transformer placement); Llama's own
LlamaRMSNorm class picks that path under scheme='auto' as LayerNorm does for BERT."""
import pytest
import torch

import smallify as sm
from smallify.quant import modules as qmod
from smallify.quant.primitives import sqnr_db

transformers = pytest.importorskip("transformers")


def tiny(name):
    torch.manual_seed(0)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64)
        return cfg, transformers.BertModel(cfg).eval(), "last_hidden_state"
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    return cfg, transformers.LlamaForCausalLM(cfg).eval(), "logits"


@pytest.fixture(scope="module", params=["bert", "llama"])
def quantized(request):
    cfg, model, key = tiny(request.param)
    calib = torch.randint(0, 200, (32, 16), generator=torch.Generator().manual_seed(1))
    return request.param, cfg, model, key, sm.quantize(model, sm.Int8Static(), calib, progress=False)


def test_every_linear_is_quantized_and_the_rest_listed_float(quantized):
    name, cfg, model, key, q = quantized
    rep = q.quant_report
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert rep.scheme == "transformer" and sorted(rep.quantized) == linears
    assert len(linears) == (2 * 7 + 1 if name == "llama" else 2 * 6 + 1)          # + lm_head / pooler
    assert all(isinstance(q.get_submodule(n), qmod.QuantLinear) for n in linears)
    norms = [n for n, m in model.named_modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))]
    assert norms and set(norms) <= set(rep.floating)                               # listed, with the reason


def test_output_stays_close(quantized):
    name, cfg, model, key, q = quantized
    x = torch.randint(0, 200, (8, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(x)[key], q(x)[key]
    assert sqnr_db(want, got) > (28.0 if name == "llama" else 40.0)                # measured: 32 dB, 63 dB
    assert torch.nn.functional.cosine_similarity(want.flatten(1), got.flatten(1)).min() > 0.999


def test_quantized_llama_generates_and_round_trips(quantized, tmp_path):
    name, cfg, model, key, q = quantized
    if name != "llama":
        pytest.skip("an encoder")
    x = torch.randint(1, 200, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert q.generate(x, max_new_tokens=4, do_sample=False).shape == (2, 12)
    sm.save(q, tmp_path / "l.smallify")
    back = sm.load(tmp_path / "l.smallify", transformers.LlamaForCausalLM(cfg))
    with torch.no_grad():
        assert torch.equal(back(x)[key], q(x)[key])
