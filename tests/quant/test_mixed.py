"""Sensitivity, fallback and mixed precision: the plan meets the bound it was given, is smaller than all-INT8,
lists each layer's choice with a reason, and saves and exports like any quantized model."""
import onnxruntime as ort
import pytest
import torch

import smallify as sm
from smallify.errors import ConfigError, DataError
from smallify.quant.primitives import sqnr_db


def _closeness(model, x):
    with torch.no_grad():
        ref = model(x)

    def metric(m):
        with torch.no_grad():
            return -100 * float((m(x) - ref).pow(2).mean())
    return metric


def test_max_drop_holds_and_plan_is_smaller_than_int8(tmp_path, model, calib):
    from conftest import small_resnet

    metric = _closeness(model, calib)
    q = sm.quantize(model, sm.MixedPrecision(max_drop=0.05), calib, progress=False, eval_fn=metric)
    plan = q.mixed_plan
    assert metric(q) >= plan.reference - 0.05 and metric(q) == pytest.approx(plan.metric)
    assert plan.size_ratio < 1.0 and {c.choice for c in plan.layers} >= {"int4"}
    assert all(c.reason for c in plan.layers) and len(plan.layers) == 7
    y = q(calib)
    sm.save(q, tmp_path / "mixed.smallify")
    assert torch.equal(sm.load(tmp_path / "mixed.smallify", small_resnet())(calib), y)
    sm.export_onnx(q, tmp_path / "mixed.onnx", calib[:1])
    s = ort.InferenceSession(str(tmp_path / "mixed.onnx"), providers=["CPUExecutionProvider"])
    assert sqnr_db(y, torch.from_numpy(s.run(None, {"input": calib.numpy()})[0])) > 35


def test_fallback_puts_sensitive_layers_back_in_float(model, calib):
    metric = _closeness(model, calib)
    int8 = metric(sm.quantize(model, sm.Int8Static(), calib, progress=False))
    q = sm.quantize(model, sm.MixedPrecision(max_drop=-int8 * 0.9, candidates=(8,)), calib, progress=False, eval_fn=metric)
    floats = [c for c in q.mixed_plan.layers if c.choice == "float"]
    assert floats and all(c.reason.startswith("fallback") for c in floats)
    assert metric(q) >= int8 * 0.9 - 1e-9


def test_size_budget_without_eval_fn_uses_sqnr(model, calib):
    q = sm.quantize(model, sm.MixedPrecision(size_budget=0.7), calib, progress=False)
    assert q.mixed_plan.size_ratio <= 0.7
    assert "int4" in str(q.mixed_plan)


def test_ONNX_path_mixed_precision(tmp_path, model, calib, float_onnx):
    import numpy as np

    x = calib.numpy()
    ref = ort.InferenceSession(str(float_onnx)).run(None, {"input": x})[0]

    def metric(path):
        return -100 * float(np.mean((ort.InferenceSession(path).run(None, {"input": x})[0] - ref) ** 2))

    res = sm.quantize(str(float_onnx), sm.MixedPrecision(max_drop=0.05), {"input": x}, out=tmp_path / "m.onnx",
                      progress=False, eval_fn=metric)
    assert metric(str(tmp_path / "m.onnx")) >= res.plan.reference - 0.05 and res.plan.size_ratio < 1


def test_bad_mixed_precision_input(model, calib):
    with pytest.raises(ConfigError, match="needs max_drop"):
        sm.MixedPrecision()
    with pytest.raises(ConfigError, match="accepted: integers 2..8"):
        sm.MixedPrecision(max_drop=1, candidates=(8, 1))
    with pytest.raises(DataError, match="eval_fn raised ZeroDivisionError"):
        sm.quantize(model, sm.MixedPrecision(max_drop=0.3), calib, progress=False, eval_fn=lambda m: 1 / 0)
    with pytest.raises(DataError, match="eval_fn returned None"):
        sm.quantize(model, sm.MixedPrecision(max_drop=0.3), calib, progress=False, eval_fn=lambda m: None)
    with pytest.raises(ConfigError, match="cannot be met"):
        sm.quantize(model, sm.MixedPrecision(max_drop=0.0, fallback=False), calib, progress=False,
                    eval_fn=_closeness(model, calib))
