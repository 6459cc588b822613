import numpy as np
import pytest
import torch

from smallify.errors import ConfigError, DataError
from smallify.quant.observers import HistogramObserver, MinMaxObserver, make_observer, range_of


def test_minmax_per_tensor_over_batches():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([0.5, -1.0]))
    obs.observe(torch.tensor([[3.0, 0.0]]))
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (-1.0, 3.0)


def test_minmax_per_channel():
    obs = MinMaxObserver(axis=1)
    obs.observe(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    lo, hi = obs.range()
    assert lo.tolist() == [1.0, -2.0] and hi.tolist() == [3.0, 4.0]


def test_percentile_matches_numpy_within_a_bin():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(10_000, generator=g) * (1 + i) for i in range(4)]   # range grows batch by batch
    obs = HistogramObserver(bins=2048)
    for d in data:
        obs.observe(d)
    allv = torch.cat(data).numpy()
    lo, hi = obs.percentile_range(99.0)
    bin_width = (obs.hi - obs.lo) / obs.bins
    # re-binning on growth moves counts by at most one (old, narrower) bin: allow 3 bins
    assert abs(lo.item() - np.percentile(allv, 0.5)) < 3 * bin_width
    assert abs(hi.item() - np.percentile(allv, 99.5)) < 3 * bin_width


def test_percentile_100_is_minmax():
    obs = HistogramObserver()
    obs.observe(torch.tensor([-2.0, 1.0, 7.0]))
    lo, hi = obs.percentile_range(100.0)
    assert (lo.item(), hi.item()) == (-2.0, 7.0)


def test_percentile_clips_outliers():
    x = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)), torch.tensor([20.0])])   # bins are 20/2048 wide
    obs = make_observer("percentile", 99.9)
    obs.observe(x)
    lo, hi = range_of(obs)
    assert 0.99 < hi.item() < 1.02 and lo.item() >= 0


def test_bad_inputs():
    with pytest.raises(DataError, match="NaN or Inf"):
        MinMaxObserver(name="conv1").observe(torch.tensor([float("inf")]))
    with pytest.raises(DataError, match="no calibration data"):
        MinMaxObserver().range()
    with pytest.raises(ConfigError, match="accepted: 'minmax', 'percentile', 'entropy', 'mse'"):
        make_observer("kl")
    obs = HistogramObserver()
    obs.observe(torch.ones(3))
    with pytest.raises(ConfigError, match="percentile"):
        obs.percentile_range(40.0)


def quant_error(x, method, keep=None):
    from smallify.quant.primitives import UINT8_ACT, compute_qparams, fake_quantize

    obs = make_observer(method, fmt=UINT8_ACT)
    for chunk in x.split(50_000):
        obs.observe(chunk)
    s, z = compute_qparams(*range_of(obs), UINT8_ACT)
    err = (fake_quantize(x, s, z, UINT8_ACT) - x) ** 2
    return float(err.mean() if keep is None else err[keep].mean())


def test_mse_beats_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    lognormal = torch.exp(torch.randn(200_000, generator=g) * 0.8)         # GELU/softplus-like long right tail
    assert quant_error(lognormal, "mse") < 0.85 * quant_error(lognormal, "minmax")


def test_entropy_clips_rare_outliers_and_keeps_the_bulk_precise():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    outlier = torch.rand(n, generator=g) < 0.001
    x = torch.relu(torch.where(outlier, torch.randn(n, generator=g) * 10, torch.randn(n, generator=g)))
    bulk = ~outlier
    # KL keeps the shape of the distribution: the 99.9 % bulk is quantized ~10x more finely than min-max does
    assert quant_error(x, "entropy", bulk) < 0.1 * quant_error(x, "minmax", bulk)


def test_entropy_ignores_exact_zeros():
    # half of the values are exact ReLU zeros: they must not pull the range in (uniform data: keep ~all of it)
    x = torch.relu(torch.linspace(-1, 1, 200_001))
    obs = make_observer("entropy")
    obs.observe(x)
    assert range_of(obs)[1].item() > 0.9
