"""Low-bit, per-group, FP8 and half-precision formats: closed-form numerics, packed storage on disk,
ONNX output equal to the PyTorch simulation, and save -> load -> same output."""
import os

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import smallify as sm
from smallify.errors import ConfigError
from smallify.quant.primitives import (FloatFormat, IntFormat, fp8_fake_quantize, fp8_scale, group_shape,
                                       sqnr_db, weight_qparams)


class MLP(nn.Module):
    """Linear layers on 3-D inputs (tokens): exported as MatMul, as transformers are."""

    def __init__(self, d=256, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, 16)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _ort(path, x, basic=False):
    so = ort.SessionOptions()
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def test_group_qparams_closed_form():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25], [7.0, 1.0, -14.0, 3.5]])
    scale, zero = weight_qparams(w, IntFormat(4), group_size=2, group_axis=1)
    assert scale.shape == group_shape((2, 4), 2, 1) == (2, 2)
    assert torch.allclose(scale, torch.tensor([[2 / 7, 0.5 / 7], [1.0, 2.0]]))
    assert not zero.any()
    with pytest.raises(ConfigError, match="does not divide the 4 channels"):
        weight_qparams(w, IntFormat(4), group_size=3)


@pytest.mark.parametrize("name,top", [("e4m3", 448.0), ("e5m2", 57344.0)])
def test_fp8_grid_and_saturation(name, top):
    fmt = FloatFormat(name)
    assert fmt.max == top
    x = torch.tensor([0.0, 1.0, 1.0625, 3.3, -200.0, 1e9, -1e9, top * 1.01])
    y = fp8_fake_quantize(x, torch.tensor(1.0), fmt)
    assert y[0] == 0 and y[1] == 1 and y[-3:].tolist() == [top, -top, top]   # exact grid values; saturates
    # saturate=1 (ONNX): clamp to the largest finite value, then round (torch's plain cast may give inf/NaN)
    assert torch.equal(y, x.clamp(-top, top).to(fmt.torch_dtype).float())
    # e4m3 has 3 mantissa bits: 3.3 -> 3.25, 1.0625 -> 1.0 (ties to even), -200 -> -192
    if name == "e4m3":
        assert y[2:5].tolist() == [1.0, 3.25, -192.0]
    assert fp8_scale(torch.tensor(896.0), FloatFormat("e4m3")) == 2.0


def test_format_validation_names_accepted_values():
    with pytest.raises(ConfigError, match="accepted: integers 2..8"):
        sm.WeightOnly(bits=1)
    with pytest.raises(ConfigError, match="accepted: integers 2..8"):
        sm.Int8Static(weight_bits=16)
    with pytest.raises(ConfigError, match="group_size=1 is not supported"):
        sm.WeightOnly(group_size=1)
    with pytest.raises(ConfigError, match="accepted: 'e4m3', 'e5m2'"):
        sm.FP8Static(format="e3m4")
    with pytest.raises(ConfigError, match="FP8Static takes no weight_bits or group_size"):
        sm.FP8Static(group_size=32)
    with pytest.raises(ConfigError, match="not supported with FP8"):
        sm.FP8Static(calibration="entropy")
    with pytest.raises(ConfigError, match="accepted: 'fp16', 'bf16'"):
        sm.Float16(dtype="fp8")
    with pytest.raises(ConfigError, match=r"layer_bits\['fc'\]=12"):
        sm.Int8Static(layer_bits={"fc": 12})
    with pytest.raises(ConfigError, match="does not divide the 256 input channels of layer 'fc1'"):
        sm.quantize(MLP(), sm.WeightOnly(bits=4, group_size=96))


def test_int8_group_size_that_does_not_divide_names_the_layer(tmp_path):
    """Int8Static(weight_bits=4, group_size=...) on both paths: the error names the layer and what fits."""
    x = torch.randn(4, 8, 256)
    expected = (r"group_size=96 does not divide the 256 input channels of layer 'fc1'; accepted: a divisor "
                r"of 256, None \(one scale per output channel\), or leave the layer out .*skip=\('fc1',\)")
    with pytest.raises(ConfigError, match=expected):
        sm.quantize(MLP(), sm.Int8Static(weight_bits=4, group_size=96), data=x)
    with pytest.raises(ConfigError, match="1024 input channels of layer 'fc2'; accepted: a divisor of 1024, None"):
        sm.quantize(MLP(), sm.Int8Static(weight_bits=4, group_size=96, skip=("fc1", "fc3")), data=x)
    sm.export_onnx(MLP(), tmp_path / "mlp.onnx", x[:1])
    with pytest.raises(ConfigError, match=expected):
        sm.quantize(str(tmp_path / "mlp.onnx"), sm.Int8Static(weight_bits=4, group_size=96), data=x.numpy(),
                    out=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(ConfigError, match=r"the 6 input channels of layer '0'; accepted: 2, 3, 6, None"):
        sm.quantize(nn.Sequential(nn.Linear(6, 4)), sm.Int8Static(weight_bits=4, group_size=4), data=torch.randn(8, 6))


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    sm.export_onnx(MLP(), path, torch.randn(1, 8, 256))
    return path


@pytest.mark.parametrize("bits,symmetric,min_sqnr", [(8, True, 38), (4, True, 17), (4, False, 18), (3, True, 11),
                                                     (2, False, 5)])
def test_weight_only_pytorch_onnx_and_container(tmp_path, mlp_onnx, bits, symmetric, min_sqnr):
    model, x = MLP(), torch.randn(4, 8, 256, generator=torch.Generator().manual_seed(3))
    q = sm.quantize(model, sm.WeightOnly(bits=bits, group_size=64, symmetric=symmetric))
    y = q(x)
    assert sqnr_db(model(x), y) > min_sqnr
    # packed on disk: b bits per weight plus one fp32 scale (and a packed zero point) per 64 weights
    sm.save(q, tmp_path / "q.smallify")
    sm.save(model, tmp_path / "f.smallify")
    ratio = os.path.getsize(tmp_path / "q.smallify") / os.path.getsize(tmp_path / "f.smallify")
    expected = (bits + 32 / 64 + (0 if symmetric else bits / 64)) / 32
    assert ratio == pytest.approx(expected, abs=0.01)
    assert torch.equal(sm.load(tmp_path / "q.smallify", MLP())(x), y)
    # ONNX from PyTorch and ONNX in: the same numbers as the simulation
    sm.export_onnx(q, tmp_path / "q.onnx", x[:1])
    assert sqnr_db(y, _ort(tmp_path / "q.onnx", x, basic=True)) > 60
    res = sm.quantize(str(mlp_onnx), sm.WeightOnly(bits=bits, group_size=64, symmetric=symmetric), out=tmp_path / "o.onnx")
    assert sqnr_db(y, _ort(tmp_path / "o.onnx", x, basic=True)) > 60
    assert len(res.report.quantized) == 3
    if bits <= 4:
        types = {i.data_type for i in onnx.load(tmp_path / "o.onnx").graph.initializer}
        assert (onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4) in types
        assert os.path.getsize(tmp_path / "o.onnx") < 0.17 * os.path.getsize(mlp_onnx)


def test_int4_onnx_runs_as_matmul_nbits(tmp_path, mlp_onnx):
    sm.quantize(str(mlp_onnx), sm.WeightOnly(bits=4, group_size=64), out=tmp_path / "o.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "o.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("MatMulNBits") == 3 and "DequantizeLinear" not in ops


def test_weight_only_auto_group_and_skip():
    q = sm.quantize(MLP(), sm.WeightOnly(bits=4, skip=("fc3",), layer_bits={"fc2": 8}))
    assert q.fc1.spec.group_size == 128 and q.fc1.spec.fmt.bits == 4
    assert q.fc2.spec.fmt.bits == 8 and isinstance(q.fc3, nn.Linear) and not hasattr(q.fc3, "spec")
    assert q.quant_report.floating == {"fc3": "skipped by pattern 'fc3'"}


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_static_pytorch_onnx_container(tmp_path, model, calib, float_onnx, fmt):
    from conftest import small_resnet

    q = sm.quantize(model, sm.FP8Static(format=fmt), calib, progress=False)
    y = q(calib)
    assert sqnr_db(model(calib), y) > (24 if fmt == "e4m3" else 18)
    sm.save(q, tmp_path / "q.smallify")
    assert torch.equal(sm.load(tmp_path / "q.smallify", small_resnet())(calib), y)
    sm.export_onnx(q, tmp_path / "q.onnx", calib[:1])
    proto = onnx.load(tmp_path / "q.onnx")
    fp8 = onnx.TensorProto.FLOAT8E4M3FN if fmt == "e4m3" else onnx.TensorProto.FLOAT8E5M2
    assert sum(i.data_type == fp8 and len(i.dims) == 4 for i in proto.graph.initializer) == 6   # conv weights
    assert sqnr_db(y, _ort(tmp_path / "q.onnx", calib, basic=True)) > 40
    res = sm.quantize(str(float_onnx), sm.FP8Static(format=fmt), {"input": calib.numpy()}, out=tmp_path / "o.onnx",
                      progress=False)
    # the ONNX path folds BatchNorm in ONNX Runtime, so it rounds slightly different weights: as accurate, not equal
    assert sqnr_db(model(calib), _ort(tmp_path / "o.onnx", calib, basic=True)) > (24 if fmt == "e4m3" else 18)
    assert res.report.scheme == "cnn"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_float16_pytorch_onnx_container(tmp_path, model, calib, float_onnx, dtype):
    from conftest import small_resnet

    q = sm.quantize(model, sm.Float16(dtype=dtype, skip=("fc",)))
    assert q.get_submodule("stem.0").layer.weight.dtype == (torch.float16 if dtype == "fp16" else torch.bfloat16)
    assert q.quant_report.floating == {"fc": "not selected by layers/skip"}
    y = q(calib)
    assert sqnr_db(model(calib), y) > (55 if dtype == "fp16" else 40)
    sm.save(q, tmp_path / "q.smallify")
    assert torch.equal(sm.load(tmp_path / "q.smallify", small_resnet())(calib), y)
    sm.export_onnx(q, tmp_path / "q.onnx", calib[:1])
    assert sqnr_db(y, _ort(tmp_path / "q.onnx", calib)) > 45
    res = sm.quantize(str(float_onnx), sm.Float16(dtype=dtype), out=tmp_path / "o.onnx")
    half = onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.BFLOAT16
    assert sum(i.data_type == half for i in onnx.load(tmp_path / "o.onnx").graph.initializer) >= 8
    assert os.path.getsize(tmp_path / "o.onnx") < 0.56 * os.path.getsize(float_onnx)
    assert len(res.report.quantized) == 7   # 6 convolutions and the classifier


def test_low_bit_static_weights_roundtrip(tmp_path, model, calib):
    from conftest import small_resnet

    cfg = sm.Int8Static(weight_bits=4, layer_bits={"fc": 8, "stem.*": "float"})
    q = sm.quantize(model, cfg, calib, progress=False)
    assert q.get_submodule("stem.0").spec.fmt is None and q.fc.spec.fmt.bits == (7 if cfg.reduce_range else 8)
    y = q(calib)
    sm.save(q, tmp_path / "q.smallify")
    assert torch.equal(sm.load(tmp_path / "q.smallify", small_resnet())(calib), y)
    sm.export_onnx(q, tmp_path / "q.onnx", calib[:1])
    assert sqnr_db(y, _ort(tmp_path / "q.onnx", calib)) > 35
    types = [i.data_type for i in onnx.load(tmp_path / "q.onnx").graph.initializer]
    assert types.count(onnx.TensorProto.INT4) == 5   # 6 convolutions, the stem left in float


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(sm.ModelError, match="without a smallify manifest"):
        sm.load(tmp_path / "plain.safetensors", MLP())
    (tmp_path / "junk.smallify").write_bytes(b"not a file")
    with pytest.raises(sm.ModelError, match="is not a .smallify"):
        sm.load(tmp_path / "junk.smallify", MLP())
    q = sm.quantize(MLP(), sm.WeightOnly(bits=4))
    sm.save(q, tmp_path / "q.smallify")
    with pytest.raises(sm.ModelError, match="no layer 'fc1'|does not fit"):
        sm.load(tmp_path / "q.smallify", nn.Sequential(nn.Linear(3, 3)))


def test_int8_dynamic_fuses_into_dynamic_quantize_matmul(tmp_path, mlp_onnx):
    model, x = MLP(), torch.randn(4, 8, 256, generator=torch.Generator().manual_seed(5))
    q = sm.quantize(model, sm.Int8Dynamic(skip=("fc3",)))
    y = q(x)
    assert sqnr_db(model(x), y) > 35 and isinstance(q.fc3, nn.Linear) and not hasattr(q.fc3, "spec")
    sm.save(q, tmp_path / "d.smallify")
    assert torch.equal(sm.load(tmp_path / "d.smallify", MLP())(x), y)
    sm.export_onnx(q, tmp_path / "d.onnx", x[:1])
    res = sm.quantize(str(mlp_onnx), sm.Int8Dynamic(skip=("fc3",)), out=tmp_path / "d2.onnx")
    assert res.report.floating == {"fc3": "skipped by pattern 'fc3'"}
    for path in ("d.onnx", "d2.onnx"):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt_{path}")
        s = ort.InferenceSession(str(tmp_path / path), so, providers=["CPUExecutionProvider"])
        assert sqnr_db(y, torch.from_numpy(s.run(None, {"input": x.numpy()})[0])) > 60   # the same numbers
        ops = [n.op_type for n in onnx.load(tmp_path / f"opt_{path}").graph.node]
        assert ops.count("DynamicQuantizeMatMul") == 2 and ops.count("MatMul") == 1
