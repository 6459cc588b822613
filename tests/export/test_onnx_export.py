import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import smallify as sm
from smallify.quant.primitives import sqnr_db

INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
                   "QLinearAdd"}


def optimized_ops(path, tmp_path) -> list[str]:
    """Op types of the graph ONNX Runtime actually runs (after its optimizations)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.fixture(scope="module")
def exported(model, calib, tmp_path_factory):
    q = sm.quantize(model, sm.Int8Static(), calib, progress=False)
    path = tmp_path_factory.mktemp("export") / "int8.onnx"
    sm.export_onnx(q, path, calib[:1])
    return q, path


def test_qdq_graph_has_int8_weights_and_int32_biases(exported):
    _, path = exported
    g = onnx.load(path).graph
    inits = {i.name: i for i in g.initializer}
    conv_weights = [n.input[1] for n in g.node if n.op_type == "Conv"]
    producers = {o: n for n in g.node for o in n.output}
    for w in conv_weights:
        dq = producers[w]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT8
    biases = [producers[n.input[2]] for n in g.node if n.op_type == "Conv" and len(n.input) > 2]
    assert biases and all(inits[b.input[0]].data_type == onnx.TensorProto.INT32 for b in biases)
    act_q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in act_q)
    assert not any(n.op_type == "Relu" for n in g.node)     # folded into the quantizers' clamp


def test_onnx_runtime_runs_integer_kernels(exported, tmp_path):
    _, path = exported
    ops = optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 6 and "QLinearAdd" in ops and "QGemm" in ops
    assert "Conv" not in ops and "FusedConv" not in ops     # no float convolution left
    assert "QLinearGlobalAveragePool" in ops and "DequantizeLinear" not in ops   # integer from input to logits


def test_onnx_output_matches_fake_quantized_pytorch(exported):
    q, path = exported
    x = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = q(x).numpy()
    # integer requantization rounds differently from float fake-quant by at most an LSB per layer
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
    assert sqnr_db(torch.from_numpy(want), torch.from_numpy(got)) > 35
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95   # seeded random weights: many near ties


def test_dynamic_batch(exported):
    _, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 7):
        assert sess.run(None, {"input": np.zeros((b, 1, 16, 16), np.float32)})[0].shape == (b, 10)


def test_weight_bytes_shrink_to_a_quarter(exported, float_onnx):
    _, path = exported

    def payload(p):
        return sum(len(i.raw_data) or len(i.SerializeToString()) for i in onnx.load(p).graph.initializer)

    # int8 weights + int32 biases + scales; the whole-file ratio on the real model is checked in test_demo
    assert payload(path) < 0.32 * payload(float_onnx)   # 0.25 + per-channel scales of a 5k-weight model


def test_unwritable_output_leaves_nothing(model, calib, tmp_path):
    with pytest.raises(sm.OutputError, match="does not exist"):
        sm.export_onnx(model, tmp_path / "missing" / "m.onnx", calib[:1])
    assert list(tmp_path.iterdir()) == []


class Mixer(torch.nn.Module):
    """Linear layers on 3-D inputs: the exporter writes MatMul(x, W^T) with the transpose folded and renamed."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 4)

    def forward(self, x):                                     # (B, T, 16)
        h = self.b(torch.relu(self.a(x))) + x
        return self.head(h.mean(1))


def test_linear_on_3d_inputs_exports_with_integer_matmuls(tmp_path):
    torch.manual_seed(0)
    m = Mixer().eval()
    x = torch.randn(64, 10, 16)
    q = sm.quantize(m, sm.Int8Static(), x, progress=False)
    path = tmp_path / "mixer.onnx"
    sm.export_onnx(q, path, x[:1])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - q(x).numpy()).max() < 0.02 * np.abs(q(x).numpy()).max()
    ops = optimized_ops(path, tmp_path)
    assert ops.count("QLinearMatMul") + ops.count("MatMulIntegerToFloat") + ops.count("QGemm") == 3, ops
