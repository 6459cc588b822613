"""The open twin table: one registry from a float layer type to its quantized twin. transformers' Conv1D
(GPT-2's layer, a Linear with the weight stored [in, out]) is registered by class name, so transformers stays
optional; a tiny random GPT-2 built from a config is quantized on the PyTorch path without tracing."""
import pytest
import torch
from torch import nn

import smallify as sm
from smallify.quant import modules as qmod
from smallify.quant.primitives import sqnr_db


@pytest.fixture(scope="module")
def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=200, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return cfg, transformers.GPT2Model(cfg).eval()


def test_gpt2_conv1d_is_quantized_and_stays_close(tiny_gpt2):
    cfg, model = tiny_gpt2
    g = torch.Generator().manual_seed(1)
    calib, test = torch.randint(0, 200, (32, 16), generator=g), torch.randint(0, 200, (16, 16), generator=g)
    q = sm.quantize(model, sm.Int8Static(), calib, progress=False)
    rep = q.quant_report
    conv1d = [l.name for l in rep.layers if l.op == "Conv1D"]
    assert len(conv1d) == 8 and sorted(rep.quantized) == sorted(conv1d)   # 2 blocks x (c_attn, c_proj, c_fc, mlp.c_proj)
    assert rep.scheme == "transformer" and rep.activations == 8
    assert set(rep.floating) == {"wte", "wpe", "h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2", "ln_f"}
    assert all(isinstance(q.get_submodule(n), qmod.QuantGPT2Conv1D) for n in conv1d)
    with torch.no_grad():
        want, got = model(test).last_hidden_state, q(test).last_hidden_state
    assert sqnr_db(want, got) > 30.0                                        # INT8 W+A: measured 39 dB
    cos = torch.nn.functional.cosine_similarity(want.flatten(1), got.flatten(1))
    assert cos.min() > 0.999


def test_gpt2_quantized_save_load_round_trip(tiny_gpt2, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, model = tiny_gpt2
    q = sm.quantize(model, sm.Int8Static(), torch.randint(0, 200, (16, 16)), progress=False)
    sm.save(q, tmp_path / "g.smallify")
    back = sm.load(tmp_path / "g.smallify", transformers.GPT2Model(cfg))
    x = torch.randint(0, 200, (4, 16))
    with torch.no_grad():
        assert torch.equal(back(x).last_hidden_state, q(x).last_hidden_state)


def test_twin_quantizes_the_transposed_weight_per_output_channel():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 5)           # nf=6 outputs, nx=5 inputs: weight [5, 6]
    twin = qmod.lookup(layer).from_float(layer)
    assert twin.weight.shape == (6, 5) and twin.weight_scale.shape == (6,)
    x = torch.randn(3, 5)
    assert torch.allclose(twin.to_float()(x), x @ twin.qweight().t() + layer.bias, atol=1e-6)
    ref = layer.weight.t().abs().amax(1) / 127
    assert torch.allclose(twin.weight_scale, ref)


def test_a_new_twin_is_one_registration():
    @qmod.register_twin(nn.Conv1d, kind="conv")
    class QuantConv1d(qmod.QuantTwin, nn.Conv1d):
        float_base = nn.Conv1d

        @classmethod
        def from_float(cls, m, spec=qmod.WeightSpec()):
            q = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
            q.load_state_dict(m.state_dict())
            q._init_weight_quant(spec)
            return q

        def forward(self, x):
            return self._conv_forward(self.quant_input(x), self.qweight(), self.bias)

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 3, padding=1)).eval()
        x = torch.randn(32, 2, 20)
        for config in (sm.Int8Static(), sm.WeightOnly(bits=8)):
            q = sm.quantize(model, config, x, progress=False)
            assert q.quant_report.quantized == ["0", "2"], config
            assert isinstance(q.get_submodule("0"), QuantConv1d)
            with torch.no_grad():
                assert sqnr_db(model(x), q(x)) > 30.0
        q = sm.quantize(model, sm.Int8Static(), x, progress=False)
        before = q.get_submodule("2").weight_scale.clone()
        sm.qat(q, sm.TrainData(x, model(x).detach(), batch_size=16), sm.TrainConfig(epochs=2, lr=1e-2),
               loss_fn=lambda out, y, x: torch.nn.functional.mse_loss(out, y), progress=False)
        after = q.get_submodule("2").weight_scale           # learned by QAT, frozen back into a buffer
        assert not isinstance(after, nn.Parameter) and not torch.equal(before, after)
    finally:
        del qmod.REGISTRY[nn.Conv1d]


def test_without_its_twin_conv1d_is_listed_float(tiny_gpt2):
    cfg, model = tiny_gpt2
    key = "transformers.pytorch_utils.Conv1D"
    twin = qmod.REGISTRY.pop(key)
    try:
        rep = sm.quantize(model, sm.Int8Static(), torch.randint(0, 200, (8, 16)), progress=False).quant_report
    finally:
        qmod.REGISTRY[key] = twin
    assert rep.quantized == [] and len(rep.floating) == 15
    assert rep.floating["h.0.attn.c_attn"] == "Conv1D has no INT8 implementation (handled: Conv2d, Linear)"


def test_quantized_gpt2_exports_to_the_same_numbers(tiny_gpt2, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg, model = tiny_gpt2

    class LastHidden(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids, use_cache=False).last_hidden_state

    x = torch.randint(0, 200, (32, 16), generator=torch.Generator().manual_seed(3))
    q = sm.quantize(LastHidden(model), sm.Int8Static(), x, progress=False)
    sm.export_onnx(q, tmp_path / "g.onnx", x[:2])
    got = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x[:8].numpy()})[0]
    with torch.no_grad():
        want = q(x[:8])
    assert sqnr_db(want, torch.from_numpy(got)) > 60           # the Q/DQ graph computes the fake-quantized model
    import onnx

    ops = [n.op_type for n in onnx.load(tmp_path / "g.onnx").graph.node]
    assert ops.count("QuantizeLinear") >= 8                      # one input quantizer per Conv1D


def test_untraced_layers_that_never_run_stay_float_and_say_so():
    class Branchy(nn.Module):            # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.a, self.ln, self.unused = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)

        def forward(self, x):
            return self.ln(self.a(x if x.sum() > 0 else -x))

    torch.manual_seed(0)
    m = Branchy().eval()
    x = torch.randn(16, 4)
    q = sm.quantize(m, sm.Int8Static(), x, progress=False)
    assert q.report.quantized == ["a"] and q.report.activations == 1
    assert q.report.floating["unused"] == "not called on the calibration data"
    assert type(q.unused) is nn.Linear
    with torch.no_grad():
        assert sqnr_db(m(x), q(x)) > 30
