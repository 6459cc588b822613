import pytest
import torch

from smallify.errors import ConfigError, ModelError
from smallify.quant.primitives import (INT8_WEIGHT, UINT8_ACT, IntFormat, compute_qparams, dequantize,
                                       fake_quantize, quantize, sqnr_db, weight_qparams)


@pytest.mark.parametrize("bits,signed,symmetric,qmin,qmax", [
    (8, True, True, -127, 127), (8, True, False, -128, 127), (8, False, False, 0, 255),
    (4, True, True, -7, 7), (4, False, False, 0, 15), (2, True, False, -2, 1), (3, True, True, -3, 3),
])
def test_integer_ranges(bits, signed, symmetric, qmin, qmax):
    fmt = IntFormat(bits, signed, symmetric)
    assert (fmt.qmin, fmt.qmax) == (qmin, qmax)


@pytest.mark.parametrize("bits", [1, 9, 16, 4.0])
def test_unsupported_bits_are_rejected(bits):
    with pytest.raises(ConfigError, match="accepted: integers 2..8"):
        IntFormat(bits)


def test_symmetric_per_tensor_closed_form():
    x = torch.tensor([-1.0, 0.5, 1.0, 0.25])
    scale, zero = compute_qparams(x.min(), x.max(), INT8_WEIGHT)
    assert scale.item() == pytest.approx(1 / 127, rel=1e-7) and zero.item() == 0
    q = quantize(x, scale, zero, INT8_WEIGHT)
    assert q.tolist() == [-127, 64, 127, 32]       # 63.5 rounds half to even -> 64; 31.75 -> 32
    assert torch.allclose(dequantize(q, scale, zero), q.float() / 127)


def test_asymmetric_uint8_closed_form():
    scale, zero = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), UINT8_ACT)
    assert scale.item() == pytest.approx(4 / 255, rel=1e-7)
    assert zero.item() == 64                          # round(1 / (4/255)) = round(63.75)
    q = quantize(torch.tensor([-1.0, 0.0, 3.0, 10.0, -5.0]), scale, zero, UINT8_ACT)
    assert q.tolist() == [0, 64, 255, 255, 0]         # 0 exact; out-of-range values clamp


def test_range_always_contains_zero():
    scale, zero = compute_qparams(torch.tensor(2.0), torch.tensor(6.0), UINT8_ACT)
    assert zero.item() == 0 and scale.item() == pytest.approx(6 / 255)


def test_per_channel_weights():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    scale, zero = weight_qparams(w, INT8_WEIGHT, per_channel=True)
    assert torch.allclose(scale, torch.tensor([2 / 127, 0.5 / 127, 1.0]))   # all-zero channel: scale 1
    q = quantize(w, scale, zero, INT8_WEIGHT, axis=0)
    assert q.tolist() == [[64, -127], [127, 64], [0, 0]]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed,symmetric", [(True, True), (True, False), (False, False)])
def test_round_trip_error_is_at_most_half_a_step(bits, signed, symmetric):
    fmt = IntFormat(bits, signed, symmetric)
    x = torch.linspace(-1.3, 2.1, 1001)
    scale, zero = compute_qparams(x.min(), x.max(), fmt)
    err = (dequantize(quantize(x, scale, zero, fmt), scale, zero) - x).abs().max()
    assert err <= scale / 2 + 1e-6


def test_fake_quantize_matches_torch_oracle():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    scale, zero = compute_qparams(x.min(), x.max(), UINT8_ACT)
    ours = fake_quantize(x, scale, zero, UINT8_ACT)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero), 0, 255)
    assert torch.equal(ours, ref)
    assert torch.equal(ours, dequantize(quantize(x, scale, zero, UINT8_ACT), scale, zero))


def test_fake_quantize_straight_through_gradient():
    x = torch.tensor([-0.5, 0.2, 5.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.01), torch.tensor(0), INT8_WEIGHT).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_nan_weights_are_rejected():
    with pytest.raises(ModelError, match="NaN or Inf"):       # a model problem, as on the ONNX path
        weight_qparams(torch.tensor([1.0, float("nan")]))


def test_int8_weight_sqnr_of_gaussian_is_near_theory():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    scale, zero = weight_qparams(w)
    wq = dequantize(quantize(w, scale, zero, INT8_WEIGHT, 0), scale, zero, 0)
    # uniform rounding noise of variance scale^2 / 12 per channel
    expected = 10 * torch.log10(w.pow(2).mean() / (scale.pow(2) / 12).mean()).item()
    assert abs(sqnr_db(w, wq) - expected) < 0.3 and sqnr_db(w, wq) > 40
