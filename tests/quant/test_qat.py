"""Quantization-aware training with learned step sizes: it recovers what low-bit PTQ loses on a real model, and
the result exports, saves and loads like a PTQ model."""
import pytest
import torch

import smallify as sm
from smallify.quant import modules as qmod
from smallify.quant.primitives import sqnr_db


@pytest.fixture(scope="module")
def fmnist():
    from smallify.examples import fashion_mnist

    xtr, ytr = fashion_mnist.load("train")
    xte, yte = fashion_mnist.load("test")
    return (torch.from_numpy(fashion_mnist.normalize(xtr[:4000])), torch.from_numpy(ytr[:4000]).long(),
            torch.from_numpy(fashion_mnist.normalize(xte[:2000])), torch.from_numpy(yte[:2000]).long())


@pytest.mark.slow
def test_qat_recovers_3bit_ptq_loss_and_exports(tmp_path, fmnist):
    from smallify.examples.demo import pretrained_fmnist_resnet
    from smallify.examples.models import fmnist_resnet

    xtr, ytr, xte, yte = fmnist

    def acc(model):
        with torch.no_grad():
            return float((model(xte).argmax(1) == yte).float().mean())

    model = pretrained_fmnist_resnet()
    fp32 = acc(model)
    q = sm.quantize(model, sm.Int8Static(weight_bits=3), xtr[:256], progress=False)
    ptq = acc(q)
    sm.qat(q, sm.TrainData(xtr, ytr, batch_size=64), sm.TrainConfig(epochs=1, lr=1e-3), progress=False)
    qat = acc(q)
    # measured: fp32 0.9375, ptq 0.891, qat 0.925 on these 2000 test images
    assert ptq < fp32 - 0.02 and qat > ptq + 0.02 and qat > fp32 - 0.025
    # scales were learned, then frozen into buffers: the model exports and saves like PTQ's
    assert all(not isinstance(m.scale, torch.nn.Parameter) for m in q.modules() if isinstance(m, qmod.ActQuant))
    y = q(xte[:64])
    sm.export_onnx(q, tmp_path / "qat.onnx", xte[:1])
    import onnxruntime as ort

    s = ort.InferenceSession(str(tmp_path / "qat.onnx"), providers=["CPUExecutionProvider"])
    assert sqnr_db(y, torch.from_numpy(s.run(None, {"input": xte[:64].numpy()})[0])) > 30
    sm.save(q, tmp_path / "qat.smallify")
    assert torch.equal(sm.load(tmp_path / "qat.smallify", fmnist_resnet())(xte[:64]), y)


def test_lsq_gradients_reach_scales_and_weights(model, calib):
    q = sm.quantize(model, sm.Int8Static(weight_bits=4), calib, progress=False)
    for m in q.modules():
        if hasattr(m, "make_scale_learnable"):
            m.make_scale_learnable()
    q.train()
    q(calib).pow(2).mean().backward()
    conv = q.get_submodule("layers.0.0.conv1")
    assert conv.weight_scale.grad is not None and conv.weight_scale.grad.abs().sum() > 0
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    act = next(m for m in q.modules() if isinstance(m, qmod.ActQuant))
    assert act.scale.grad is not None


def test_qat_needs_a_quantized_model(model, calib):
    with pytest.raises(sm.ModelError, match="needs a model returned by smallify.quantize"):
        sm.qat(model, sm.TrainData(calib, torch.zeros(len(calib), dtype=torch.long)))
