"""What every verb shares: a wrong config type is a ConfigError naming the accepted types (never an
AttributeError three calls deep), and every result carries ``.report`` with ``to_dict()`` and ``__str__``
(the older attribute names kept as aliases)."""
import json

import pytest
import torch
from torch import nn

import smallify as sm
from smallify.report import Report
from tests.conftest import small_resnet


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return sm.TrainData(x, torch.randint(0, 4, (64,), generator=g), batch_size=16)


@pytest.mark.parametrize("call, message", [
    (lambda m, d: sm.prune(m, sm.Unstructured(), torch.randn(2, 8)),
     r"prune\(\) takes config of type ChannelPrune; got Unstructured \(Unstructured configures sparsify, prune_gradually\)"),
    (lambda m, d: sm.distill(m, m, d, sm.TrainConfig()),
     r"distill\(\) takes config of type KD; got TrainConfig \(TrainConfig configures train, qat, distill \(as train_config=\)"),
    (lambda m, d: sm.distill(m, m, d, sm.KD(), sm.KD()), r"distill\(\) takes train_config of type TrainConfig; got KD"),
    (lambda m, d: sm.train(m, d, sm.KD()), r"train\(\) takes config of type TrainConfig; got KD \(KD configures distill\)"),
    (lambda m, d: sm.sparsify(m, sm.ChannelPrune()), r"sparsify\(\) takes config of type Unstructured; got ChannelPrune"),
    (lambda m, d: sm.prune_gradually(m, d, sm.ChannelPrune()), r"prune_gradually\(\) takes config of type Unstructured"),
    (lambda m, d: sm.prune_gradually(m, d, sm.Unstructured(), sm.KD()), r"prune_gradually\(\) takes train_config of type TrainConfig"),
    (lambda m, d: sm.prune_attention(m, sm.ChannelPrune()), r"prune_attention\(\) takes config of type AttentionPrune"),
    (lambda m, d: sm.quantize(m, sm.ChannelPrune(), torch.randn(4, 8)),
     r"quantize\(\) takes config of type AWQ, DataFree, FP8Static, Float16, GPTQ, Int8Dynamic, Int8Static, LLMWeightOnly, MixedPrecision, RTN, WeightOnly; got ChannelPrune \(ChannelPrune configures prune\)"),
    (lambda m, d: sm.qat(sm.quantize(m, sm.Int8Static(), torch.randn(16, 8), progress=False), d, sm.KD()),
     r"qat\(\) takes config of type TrainConfig; got KD"),
])
def test_a_wrong_config_type_is_a_config_error_naming_the_accepted_types(call, message):
    with pytest.raises(sm.ConfigError, match=message):
        call(_mlp(), _data())



def test_the_training_verbs_take_data_then_config_under_the_same_names():
    import inspect

    for verb in (sm.train, sm.qat, sm.distill, sm.prune_gradually):
        names = list(inspect.signature(verb).parameters)
        assert names.index("config") == names.index("data") + 1, verb.__name__
        assert {"eval_fn", "checkpoint", "progress"} <= set(names), verb.__name__
    assert "train_config" in inspect.signature(sm.distill).parameters
    assert "train_config" in inspect.signature(sm.prune_gradually).parameters
    # the order of the releases before (config, then data) gives the same model, with a DeprecationWarning
    config, train_config = sm.Unstructured(sparsity=0.5), sm.TrainConfig(epochs=2, lr=1e-2)
    new = sm.prune_gradually(_mlp(), _data(), config, train_config, progress=False)
    with pytest.warns(DeprecationWarning, match=r"pass data first.*prune_gradually\(model, data, config\)"):
        old = sm.prune_gradually(_mlp(), config, _data(), train_config, progress=False)
    assert sm.sparsity_of(new) == pytest.approx(0.5, abs=0.02)
    for a, b in zip(new.state_dict().values(), old.state_dict().values()):
        assert torch.equal(a, b)

def _is_report(result, *aliases):
    rep = result.report
    assert isinstance(rep, Report)
    json.dumps(rep.to_dict())                   # JSON-ready
    assert str(rep).strip()
    for alias in aliases:
        assert getattr(result, alias) is rep
    return rep


def test_every_verb_result_has_one_report_attribute(calib):
    model = small_resnet()
    q = sm.quantize(model, sm.Int8Static(), calib, progress=False)
    assert "7 layer(s) quantized" in str(_is_report(q, "quant_report"))
    for config in (sm.WeightOnly(bits=4), sm.Float16(), sm.Int8Dynamic()):
        _is_report(sm.quantize(model, config), "quant_report")
    mixed = sm.quantize(model, sm.MixedPrecision(size_budget=0.7), calib, progress=False)
    rep = _is_report(mixed, "quant_report")
    assert rep.plan is mixed.mixed_plan and rep.to_dict()["plan"]["size_ratio"] <= 0.7
    assert "mixed precision: metric" in str(rep)
    pruned = sm.prune(model, sm.ChannelPrune(ratio=0.5), calib[:2])
    assert _is_report(pruned, "prune_report").to_dict()["macs_after"] < pruned.report.macs_before
    mlp, data = _mlp(), _data()
    trained = sm.train(mlp, data, sm.TrainConfig(epochs=1), progress=False)
    assert _is_report(trained).to_dict()["steps"] == 4 and "4 step(s)" in str(trained.report)
    student = sm.distill(_mlp(), mlp, data, sm.KD(), sm.TrainConfig(epochs=1), progress=False)
    assert _is_report(student).history == student.train_history


def test_attention_prune_report_keeps_its_dict_form():
    transformers = pytest.importorskip("transformers")
    from smallify.examples.minilm import SentenceEmbedder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    p = sm.prune_attention(SentenceEmbedder(transformers.BertModel(cfg, add_pooling_layer=False)).eval(),
                           sm.AttentionPrune(head_ratio=0.5, ffn_ratio=0.5, importance="l2"))
    rep = _is_report(p, "prune_report")
    assert rep["layers"] == rep.to_dict()["layers"] == [{"layer": "encoder.encoder.layer.0", "heads": [4, 2], "ffn": [64, 32]}]
    assert "heads 4 -> 2, FFN 64 -> 32" in str(rep)
