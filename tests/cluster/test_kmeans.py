"""The weight-sharing math against closed forms and brute force (smallify.cluster.kmeans)."""
import importlib.resources
import itertools

import pytest
import torch

from smallify.cluster.kmeans import (
    BINARY_LEVELS,
    INITS,
    TERNARY_LEVELS,
    assign,
    binary_fit,
    kmeans_1d,
    optimal_1d,
    power_of_two_fit,
    power_of_two_levels,
    reconstruct,
    sqnr_db,
    ternary_fit,
    ternary_optimal,
)
from smallify.errors import ConfigError, DataError


pytestmark = pytest.mark.usefixtures("one_thread")


def sse(x, c, i, w=None):
    w = torch.ones_like(x) if w is None else w
    return float((w.double() * (x.double() - c.double()[i]) ** 2).sum())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ exact optimum
def brute_contiguous(x, k, w):
    """Best SSE over every split of the sorted values into at most k contiguous runs."""
    order = torch.argsort(x)
    xs, ws = x[order].double(), w[order].double()
    n, best = len(xs), float("inf")
    for m in range(min(k, n)):                        # m cuts: m + 1 runs
        for cuts in itertools.combinations(range(1, n), m):
            total = 0.0
            for a, b in zip((0,) + cuts, cuts + (n,)):
                mu = float((ws[a:b] * xs[a:b]).sum() / ws[a:b].sum())
                total += float((ws[a:b] * (xs[a:b] - mu) ** 2).sum())
            best = min(best, total)
    return best


def brute_any(x, k, w):
    """Best SSE over every assignment of n points to k labels (no contiguity assumed)."""
    best = float("inf")
    for lab in itertools.product(range(k), repeat=len(x)):
        lab = torch.tensor(lab)
        total = 0.0
        for j in range(k):
            s = lab == j
            if s.any():
                mu = (w[s].double() * x[s].double()).sum() / w[s].double().sum()
                total += float((w[s].double() * (x[s].double() - mu) ** 2).sum())
        best = min(best, total)
    return best


def test_dp_equals_brute_force():
    g = gen(1)
    for t in range(30):
        n, k = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        x, w = torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.05
        c, i = optimal_1d(x, k, w)
        assert c.shape == (k,) and i.shape == (n,) and bool((c[1:] >= c[:-1]).all())
        assert sse(x, c, i, w) == pytest.approx(brute_contiguous(x, k, w), rel=1e-9, abs=1e-12)
        if n <= 6 and k <= 3:
            assert sse(x, c, i, w) == pytest.approx(brute_any(x, k, w), rel=1e-9, abs=1e-12)


def test_kmeans_reaches_the_dp_optimum():
    """Best of linear, density and 8 kmeans++ seeds (Lloyd to convergence) on 60 random weighted sets
    (n 8..24, k 2..4): measured 58/60 at the optimum (relative SSE <= 1e-6), the other two within 3.5 %.
    Lloyd's local optima are real (e.g. a linear-init centroid stuck on an outlier), so the bound is stated."""
    g, hits, worst = gen(0), 0, 0.0
    for _ in range(60):
        n, k = int(torch.randint(8, 25, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        x, w = torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.1
        opt = sse(x, *optimal_1d(x, k, w), w)
        runs = [("linear", 0), ("density", 0)] + [("kmeans++", s) for s in range(8)]
        got = [sse(x, *(t[0] for t in kmeans_1d(x[None], k, w[None], init=a, seed=s, iters=1000)), w) for a, s in runs]
        rel = (min(got) - opt) / opt
        assert rel >= -1e-6                                   # nothing beats the exact optimum
        hits += rel <= 1e-6
        worst = max(worst, rel)
    assert hits >= 57 and worst < 0.05


def test_kmeans_is_a_lloyd_fixed_point_and_rows_are_independent():
    g = gen(2)
    x, w = torch.randn(5, 300, generator=g) * torch.rand(5, 1, generator=g), torch.rand(5, 300, generator=g)
    for init in INITS:
        c, i = kmeans_1d(x, 8, w, init=init, iters=1000)
        assert c.dtype == torch.float32 and i.dtype == torch.int64 and bool((c[:, 1:] >= c[:, :-1]).all())
        assert torch.equal(i, assign(x, c))                   # every entry at its nearest centroid
        for r in range(5):                                    # every centroid the weighted mean of its members
            for j in range(8):
                s = i[r] == j
                if s.any():
                    mu = float((w[r, s].double() * x[r, s].double()).sum() / w[r, s].double().sum())
                    assert float(c[r, j]) == pytest.approx(mu, rel=1e-5, abs=1e-6)
            if init != "kmeans++":                            # (kmeans++ draws for all rows at once)
                c1, i1 = kmeans_1d(x[r:r + 1], 8, w[r:r + 1], init=init, iters=1000)
                assert torch.equal(c1[0], c[r]) and torch.equal(i1[0], i[r])
    c, i = kmeans_1d(x, 8, w, init="kmeans++", seed=3)
    c2, i2 = kmeans_1d(x, 8, w, init="kmeans++", seed=3)
    assert torch.equal(c, c2) and torch.equal(i, i2)          # seeded: the same draw every time


def test_fewer_distinct_values_than_k_give_error_zero():
    x = torch.tensor([[1.0, 1.0, 3.0, 3.0, 3.0, -2.0], [0.5] * 6])
    for init in INITS:
        c, i = kmeans_1d(x, 8, init=init)
        assert sse(x[0], c[0], i[0]) == 0.0 and sse(x[1], c[1], i[1]) == 0.0
        assert torch.equal(reconstruct(c, i), x)


def test_a_heavy_point_pulls_a_centroid_onto_itself():
    g = gen(3)
    x = torch.randn(1, 200, generator=g)
    x[0, 17] = 0.3337
    w = torch.ones_like(x)
    c0, _ = kmeans_1d(x, 4, w, iters=200)
    assert (c0 - 0.3337).abs().min() > 0.05                   # unweighted: no centroid there
    w[0, 17] = 1e6
    c, i = kmeans_1d(x, 4, w, iters=200)
    j = int(i[0, 17])
    assert abs(float(c[0, j]) - 0.3337) < 1e-3                 # the neighbours' pull is ~ 1e-4 of it


def test_masked_entries_do_not_move_centroids():
    g = gen(4)
    x = torch.randn(3, 500, generator=g)
    mask = torch.rand(3, 500, generator=g) > 0.4
    wild = torch.where(mask, x, 1000.0)                       # huge values outside the mask
    for init in INITS:
        c, i = kmeans_1d(wild, 16, mask=mask, init=init, iters=100)
        assert bool((i[~mask] == 0).all()) and float(c.abs().max()) < 10
        c2, i2 = kmeans_1d(torch.where(mask, x, -7.0), 16, mask=mask, init=init, iters=100)
        assert torch.equal(c, c2) and torch.equal(i, i2)     # whatever sits outside the mask
        for r in range(3 if init != "kmeans++" else 0):       # the same as clustering the masked entries alone
            cr, ir = kmeans_1d(x[r, mask[r]][None], 16, init=init, iters=100)
            assert torch.equal(cr[0], c[r]) and torch.equal(ir[0], i[r, mask[r]])


def test_kmeans_beats_the_uniform_grid_at_16_levels():
    """16 levels per row, (64, 4096) rows, default 30 iterations. Measured SQNR (dB), uniform min-max grid /
    linear / density / kmeans++: Gaussian 17.08 / 19.51 / 19.91 / 20.11 (Lloyd-Max optimum 20.2);
    Laplacian 13.04 / 17.23 / 17.47 / 18.24."""
    g = gen(0)
    u = torch.rand(64, 4096, generator=g, dtype=torch.float64) - 0.5
    laplace = (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()          # inverse CDF of Laplace(0, 1)
    rows = {"gauss": (torch.randn(64, 4096, generator=g), 17.1, 19.5), "laplace": (laplace, 13.05, 17.2)}
    for name, (x, uniform_max, kmeans_min) in rows.items():
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        step = (hi - lo) / 15
        uniform = sqnr_db(x, lo + torch.round((x - lo) / step) * step)
        assert uniform < uniform_max
        for init in INITS:
            c, i = kmeans_1d(x, 16, init=init)
            got = sqnr_db(x, reconstruct(c, i))
            assert got > kmeans_min and got > uniform + 2.0, (name, init, got, uniform)


def test_inits_on_trained_weights():
    """The bundled Fashion-MNIST ResNet's layers.2.1.conv2 (64 x 576), 16 centroids, 30 iterations. Measured SQNR
    (dB) linear / density / kmeans++: per layer 18.34 / 19.37 / 19.57; per channel 19.83 / 19.67 / 20.71."""
    from safetensors.torch import load_file
    path = importlib.resources.files("smallify.examples") / "weights" / "fmnist_resnet.safetensors"
    w = load_file(str(path))["layers.2.1.conv2.weight"]
    expect = {"layer": (18.34, 19.37, 19.57), "channel": (19.83, 19.67, 20.71)}
    for scope, x in (("layer", w.reshape(1, -1)), ("channel", w.reshape(64, -1))):
        for init, want in zip(INITS, expect[scope]):
            c, i = kmeans_1d(x, 16, init=init)
            assert sqnr_db(x, reconstruct(c, i)) == pytest.approx(want, abs=0.05), (scope, init)


# ------------------------------------------------------------------------------------------ assign, helpers
def test_assign_is_the_exact_nearest_with_ties_low():
    g = gen(5)
    x = torch.randn(4, 1000, generator=g)
    cb = torch.randn(4, 7, generator=g)                        # unsorted
    cb[:, 5] = cb[:, 2]                                        # a duplicate: the lower index wins
    d = (x.double()[:, :, None] - cb.double()[:, None, :]).abs()
    want = d.argmin(-1)                                        # argmin returns the first of equal minima
    assert torch.equal(assign(x, cb), want)
    cb = torch.tensor([[1.0, -1.0, 3.0]])                    # 0 is halfway between 1 and -1, 2 between 1 and 3
    assert assign(torch.tensor([[0.0, 2.0, -0.25, 2.5]]), cb).tolist() == [[0, 0, 1, 2]]
    cb = torch.tensor([[3.0, 1.0, -1.0]])
    assert assign(torch.tensor([[0.0, 2.0]]), cb).tolist() == [[1, 0]]


def test_reconstruct_and_sqnr():
    cb = torch.tensor([[-1.0, 2.0], [3.0, 4.0]])
    idx = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.uint8)
    assert reconstruct(cb, idx).tolist() == [[2.0, -1.0, 2.0], [3.0, 3.0, 4.0]]
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x + torch.tensor([0.5, 0.0])) == pytest.approx(10 * torch.log10(torch.tensor(100.0)).item())
    assert sqnr_db(x, x) == float("inf")


# ------------------------------------------------------------------------------------------ structured codebooks
def test_binary_scale_is_the_least_squares_optimum():
    g = gen(6)
    x = torch.randn(8, 300, generator=g) * torch.rand(8, 1, generator=g)
    scale, i = binary_fit(x)
    assert torch.allclose(scale, x.abs().mean(1, keepdim=True)) and torch.equal(i, (x >= 0).long())
    rec = reconstruct(scale * torch.tensor(BINARY_LEVELS), i)
    err = ((x - rec).double() ** 2).sum(1)
    grid = torch.linspace(0.0, 2.0, 4001, dtype=torch.float64)  # every a on a 5e-4 grid
    brute = ((x.double()[:, None, :] - grid[None, :, None] * torch.sign(x.double())[:, None, :]) ** 2).sum(-1)
    assert bool((err <= brute.min(1).values * (1 + 1e-6)).all())
    assert torch.allclose(grid[brute.argmin(1)], scale[:, 0].double(), atol=5e-4)


def test_ternary_twn_against_the_exact_optimum():
    """Gaussian rows (256 x 1024): measured SSE of TWN / exact optimum = 1.0079 at threshold 0.7 (0.5: 1.121,
    0.6: 1.048, 0.8: 1.0026, 0.9: 1.031)."""
    x = torch.randn(256, 1024, generator=gen(7))
    levels = torch.tensor(TERNARY_LEVELS)

    def row_sse(fit):
        scale, i = fit
        return ((x - reconstruct(scale * levels, i)).double() ** 2).sum(1)

    opt = row_sse(ternary_optimal(x))
    twn = row_sse(ternary_fit(x))
    assert bool((opt <= twn * (1 + 1e-9)).all())
    assert float(twn.sum() / opt.sum()) == pytest.approx(1.0079, abs=0.002)
    # the exact optimum against every "keep the m largest" by brute force on small rows
    small = torch.randn(16, 9, generator=gen(8))
    scale, i = ternary_optimal(small)
    got = ((small - reconstruct(scale * levels, i)).double() ** 2).sum(1)
    a = small.abs().double().sort(1, descending=True).values
    brute = torch.stack([(a[:, m:] ** 2).sum(1) + ((a[:, :m] - a[:, :m].mean(1, keepdim=True)) ** 2).sum(1)
                         for m in range(1, 10)], 1).min(1).values
    assert torch.allclose(got, brute, rtol=1e-6)
    # TWN's rule itself
    delta = 0.7 * small.abs().mean(1, keepdim=True)
    scale, i = ternary_fit(small)
    keep = small.abs() > delta
    assert torch.equal(i, torch.where(keep, torch.where(small > 0, 2, 0), 1))
    assert torch.allclose(scale[:, 0], (small.abs() * keep).sum(1) / keep.sum(1))
    assert ternary_fit(torch.zeros(1, 5))[0].item() == 0.0


def test_power_of_two_values_are_exact_powers_of_two():
    assert power_of_two_levels(3).tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    assert power_of_two_levels(2).tolist() == [-1.0, 0.0, 1.0] and power_of_two_levels(8).numel() == 255
    g = gen(9)
    x = torch.randn(32, 200, generator=g) * torch.rand(32, 1, generator=g) * 10
    for bits in (2, 3, 4, 5):
        scale, levels, i = power_of_two_fit(x, bits)
        rec = reconstruct(scale * levels, i)
        mant, _ = torch.frexp(rec[rec != 0])
        assert bool((mant.abs() == 0.5).all()) and bool((torch.frexp(scale)[0] == 0.5).all())
        assert torch.equal(i, assign(x, scale * levels))        # nearest level in the linear domain
        err = ((x - rec).double() ** 2).sum(1)
        _, e = torch.frexp(x.abs().amax(1, keepdim=True))
        for exp in (e - 1, e):                                  # the kept scale is the better of the two candidates
            cb = torch.ldexp(torch.ones_like(scale), exp) * levels
            assert bool((err <= ((x - reconstruct(cb, assign(x, cb))).double() ** 2).sum(1)).all())
    scale, levels, i = power_of_two_fit(torch.zeros(2, 4), 3)
    assert bool((reconstruct(scale * levels, i) == 0).all())


def test_structured_fits_respect_the_mask():
    g = gen(10)
    x = torch.randn(4, 100, generator=g)
    mask = torch.rand(4, 100, generator=g) > 0.5
    wild = torch.where(mask, x, 50.0)
    scale, i = binary_fit(wild, mask)
    assert torch.allclose(scale[:, 0], (x.abs() * mask).sum(1) / mask.sum(1)) and bool((i[~mask] == 0).all())
    scale, i = ternary_fit(wild, mask=mask)
    assert bool((i[~mask] == 1).all()) and float(scale.max()) < 5
    scale, i = ternary_optimal(wild, mask=mask)
    assert bool((i[~mask] == 1).all()) and float(scale.max()) < 5
    scale, levels, i = power_of_two_fit(wild, 3, mask=mask)
    assert bool((reconstruct(scale * levels, i)[~mask] == 0).all()) and float(scale.max()) <= 8


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    x = torch.randn(2, 10)
    for k in (1, 257, 2.0, True):
        with pytest.raises(ConfigError, match="k="):
            kmeans_1d(x, k)
    with pytest.raises(ConfigError, match="init='random'"):
        kmeans_1d(x, 4, init="random")
    with pytest.raises(DataError, match="2-D"):
        kmeans_1d(torch.randn(10), 4)
    with pytest.raises(DataError, match="NaN"):
        kmeans_1d(torch.tensor([[0.0, float("nan")]]), 2)
    with pytest.raises(DataError, match="weights"):
        kmeans_1d(x, 4, weights=-torch.ones(2, 10))
    with pytest.raises(DataError, match="mask"):
        kmeans_1d(x, 4, mask=torch.ones(2, 10))
    with pytest.raises(ConfigError, match="bits=9"):
        power_of_two_fit(x, 9)
