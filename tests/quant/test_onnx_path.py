import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import smallify as sm
from smallify.quant.primitives import sqnr_db
from tests.export.test_onnx_export import optimized_ops


def test_onnx_in_qdq_out(float_onnx, calib, model, tmp_path):
    out = tmp_path / "q.onnx"
    res = sm.quantize(str(float_onnx), sm.Int8Static(), {"input": calib.numpy()}, out=out, progress=False)
    assert res.path == str(out) and out.exists()
    assert len(res.report.quantized) == 7 and res.report.calibration_samples == 64
    x = torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert sqnr_db(model(x), torch.from_numpy(got)) > 30
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearConv") == 6 and "Conv" not in ops


def test_same_numerics_as_the_pytorch_path(float_onnx, calib, model):
    res = sm.quantize(str(float_onnx), sm.Int8Static(), {"input": calib.numpy()}, progress=False)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}
    q = sm.quantize(model, sm.Int8Static(), calib, progress=False)
    assert float(inits["input:s"]) == pytest.approx(q.act_quant["x"].scale.item(), rel=1e-7)
    assert int(inits["input:zp"]) == q.act_quant["x"].zero_point.item()
    # per-channel weight scales of the first convolution (BatchNorm folded on both paths)
    w_scale = next(v for k, v in inits.items() if k.endswith("weight:s") and v.shape == (8,))
    assert np.allclose(w_scale, q.get_submodule("stem.0").weight_scale.numpy(), rtol=1e-4)


def test_skip_and_per_tensor(float_onnx, calib):
    res = sm.quantize(str(float_onnx), sm.Int8Static(skip=("fc",), per_channel=False), {"input": calib.numpy()},
                      progress=False)
    assert res.report.floating == {"fc": "skipped by pattern 'fc'"}
    g = res.model.graph
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    assert gemm.input[1] == "fc.weight"                         # float weight kept
    scales = [i for i in g.initializer if i.name.endswith("weight:s")]
    assert scales and all(len(i.dims) == 0 for i in scales)     # one scale per layer
