import pytest
import torch
from torch import nn

import smallify as sm
from smallify.errors import ConfigError, DataError, ModelError
from smallify.quant.modules import QuantConv2d, QuantLinear
from smallify.quant.primitives import sqnr_db
from tests.conftest import small_resnet


def test_quantizes_every_conv_and_linear_and_folds_batchnorm(model, calib):
    q = sm.quantize(model, sm.Int8Static(), calib, progress=False)
    rep = q.quant_report
    assert len(rep.quantized) == 7 and rep.floating == {}          # stem, 2+2 block convs, downsample, fc
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert sum(isinstance(m, QuantConv2d) for m in q.modules()) == 6
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 1
    assert rep.calibration_samples == 64


def test_int8_output_is_close_to_float(model, calib):
    q = sm.quantize(model, sm.Int8Static(), calib, progress=False)
    x = torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 30.0                       # INT8 W+A on a seeded ResNet


def test_folded_model_matches_float_before_quantization(model, calib):
    from smallify.quant.ptq import trace
    with torch.no_grad():
        assert torch.allclose(trace(model)(calib), model(calib), atol=1e-4)


def test_activation_scales_come_from_the_calibration_range(model, calib):
    q = sm.quantize(model, sm.Int8Static(), calib, progress=False)
    x_quant = q.act_quant["x"]
    lo, hi = calib.min().item(), calib.max().item()
    assert x_quant.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert x_quant.zero_point.item() == round(-lo / ((hi - lo) / 255))


def test_skip_by_pattern_keeps_layers_float_and_says_why(model, calib):
    q = sm.quantize(model, sm.Int8Static(skip=("stem.*", "fc")), calib, progress=False)
    assert q.quant_report.floating == {"stem.0": "skipped by pattern 'stem.*'", "fc": "skipped by pattern 'fc'"}
    assert isinstance(q.get_submodule("stem.0"), nn.Conv2d) and not isinstance(q.get_submodule("stem.0"), QuantConv2d)


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.up(torch.relu(self.conv(x))))


def test_unsupported_layers_stay_float_and_are_listed():
    torch.manual_seed(0)
    m = WithUnsupported().eval()
    x = torch.randn(8, 1, 8, 8)
    q = sm.quantize(m, sm.Int8Static(), [x], progress=False)
    assert q.quant_report.quantized == ["conv", "head"]
    assert "ConvTranspose2d has no INT8 implementation" in q.quant_report.floating["up"]
    with torch.no_grad():
        assert sqnr_db(m(x), q(x)) > 30


def test_bad_calibration_data(model):
    with pytest.raises(DataError, match="empty"):
        sm.quantize(model, sm.Int8Static(), [], progress=False)
    with pytest.raises(DataError, match="NaN or Inf"):
        sm.quantize(model, sm.Int8Static(), torch.full((2, 1, 16, 16), float("nan")), progress=False)
    with pytest.raises(DataError, match="shapes"):
        sm.quantize(model, sm.Int8Static(), [torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)], progress=False)


def test_nan_weights_are_rejected(calib):
    m = small_resnet()
    with torch.no_grad():
        m.fc.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="weight of layer 'fc' \\(Linear\\) holds NaN or Inf"):   # as on the ONNX path
        sm.quantize(m, sm.Int8Static(), calib, progress=False)


def test_untraceable_model_names_the_problem():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ModelError, match="cannot trace Branchy"):
        sm.quantize(Branchy(), sm.Int8Static(), torch.randn(2, 4), progress=False)


def test_config_round_trip_and_validation():
    c = sm.Int8Static(calibration="percentile", percentile=99.9, skip=("fc",))
    d = c.to_dict()
    assert d["kind"] == "int8_static" and d["schema_version"] == 1
    assert sm.Int8Static.from_dict(d) == c
    with pytest.raises(ConfigError, match="accepted: 'minmax', 'percentile'"):
        sm.Int8Static(calibration="magic")
    with pytest.raises(ConfigError, match="unknown Int8Static field"):
        sm.Int8Static.from_dict({"bits": 3})
    with pytest.raises(ConfigError, match="accepted: 'uint8', 'int8'"):
        sm.Int8Static(activation_dtype="fp8")


def test_dataloader_batches_with_labels(model, calib):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=16)
    q = sm.quantize(model, sm.Int8Static(), loader, progress=False)   # (images, labels): labels ignored
    ref = sm.quantize(model, sm.Int8Static(), calib, progress=False)
    assert q.quant_report.calibration_samples == 64
    assert q.act_quant["x"].scale.item() == ref.act_quant["x"].scale.item()


@pytest.mark.parametrize("calibration", ["percentile", "entropy", "mse"])
def test_every_calibration_method_end_to_end(model, calib, calibration):
    q = sm.quantize(model, sm.Int8Static(calibration=calibration), calib, progress=False)
    x = torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 25.0


def test_signed_int8_activations_export(model, calib, tmp_path):
    import onnxruntime as ort

    q = sm.quantize(model, sm.Int8Static(activation_dtype="int8"), calib, progress=False)
    path = tmp_path / "s8.onnx"
    sm.export_onnx(q, path, calib[:1])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": calib.numpy()})[0]
    with torch.no_grad():
        want = q(calib).numpy()
    assert sqnr_db(torch.from_numpy(want), torch.from_numpy(got)) > 30


class Scaler(nn.Module):
    """A custom layer holding a weight; torch.fx traces through it (x * weight)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return x * self.weight


class WithFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.scaler = Scaler()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.nn.functional.linear(torch.relu(self.fc(x)), self.w)
        return self.head(self.scaler(h))


def test_every_weight_left_in_float_is_listed_with_its_reason():
    torch.manual_seed(0)
    m = WithFunctional().eval()
    x = torch.randn(32, 4)
    rep = sm.quantize(m, sm.Int8Static(), x, progress=False).quant_report
    assert rep.quantized == ["fc", "head"]
    assert set(rep.floating) == {"w", "scaler"}
    assert "functional linear" in rep.floating["w"] and "functional mul" in rep.floating["scaler"]
    assert [l.op for l in rep.layers if l.name == "scaler"] == ["Scaler"]
    assert "2 left in float" in str(rep) and "float: w (" in str(rep)
    wo = sm.quantize(m, sm.WeightOnly(bits=8)).quant_report          # the untraced paths list them too
    assert wo.quantized == ["fc", "head"]
    assert wo.floating == {"w": "Parameter has no weight-only implementation (handled: Conv2d, Linear, Conv1D)",
                           "scaler": "Scaler has no weight-only implementation (handled: Conv2d, Linear, Conv1D)"}
