"""The low-rank math (smallify.lowrank.factor), each form against a closed-form or brute-force reference in float64
on tiny shapes."""
import pytest
import torch
import torch.nn.functional as F

from smallify.lowrank import factor as fa

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=f64)


def correlated(n: int, D: int, seed: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """n x D rows with a random (non-diagonal) covariance; ``scales`` stretch the input axes first."""
    Z = randn(n, D, seed=seed)
    if scales is not None:
        Z = Z * scales
    return Z @ randn(D, D, seed=seed + 1)


def output_error(X: torch.Tensor, W: torch.Tensor, approx: torch.Tensor) -> float:
    """||X (W - approx)^T||^2 / ||X W^T||^2, measured on the data rows."""
    return float((X @ (W - approx).T).pow(2).sum() / (X @ W.T).pow(2).sum())


def lstsq_last(X: torch.Tensor, W: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Brute force: the last part (O x R) minimising ||X K^T last^T - X W^T|| by torch.linalg.lstsq."""
    return torch.linalg.lstsq(X @ K.T, X @ W.T).solution.T


# ---- svd, plain ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("O,D", [(6, 9), (9, 6), (7, 7)])
def test_svd_plain_is_eckart_young(O, D):
    W = randn(O, D, seed=O * 10 + D)
    s2 = torch.linalg.svdvals(W).pow(2)
    fit = fa.SVDFit(W)
    assert fit.full_rank == min(O, D)
    for r in range(1, fit.full_rank + 1):
        A, B = fit.at(r)
        assert A.shape == (O, r) and B.shape == (r, D)
        err = float((W - A @ B).pow(2).sum())
        assert err == pytest.approx(float(s2[r:].sum()), rel=1e-10, abs=1e-12)      # the dropped sigma^2
        assert fit.tail_error(r) == pytest.approx(fa.relative_error(W, A @ B), rel=1e-10, abs=1e-14)
        assert fa.relative_error(W, A @ B) == pytest.approx(float(s2[r:].sum() / s2.sum()), rel=1e-10, abs=1e-14)
        # balanced split: column i of A and row i of B both have norm sqrt(sigma_i)
        assert torch.allclose(A.norm(dim=0), B.norm(dim=1), rtol=1e-12, atol=0)
        assert torch.allclose(A.norm(dim=0).pow(2), s2[:r].sqrt(), rtol=1e-12, atol=0)
    A, B = fit.at(fit.full_rank)
    assert torch.allclose(A @ B, W, rtol=0, atol=1e-12)                                 # full rank: exact
    f = fa.svd_factors(W, 3)
    assert f.ranks == (3,) and torch.allclose(f.composite(), fit.at(3)[0] @ fit.at(3)[1], rtol=0, atol=1e-14)


# ---- svd, activation-aware ----------------------------------------------------------------------------------

def test_activation_aware_svd_error_is_the_tail_and_beats_plain_and_random_refits():
    O, D, n = 8, 12, 400
    W = randn(O, D, seed=1)
    X = correlated(n, D, seed=2)
    S = X.T @ X / n
    fit = fa.SVDFit(W, S, damp=1e-8)
    plain = fa.SVDFit(W)
    for r in range(1, min(O, D)):
        A, B = fit.at(r)
        measured = output_error(X, W, A @ B)
        # the whitened tail is the output error, up to the damping's share (1e-8 of mean(diag S))
        assert measured == pytest.approx(fit.tail_error(r), rel=1e-6, abs=1e-12)
        assert fa.relative_error(W, A @ B, S) == pytest.approx(measured, rel=1e-9)
        Ap, Bp = plain.at(r)
        assert measured <= output_error(X, W, Ap @ Bp) * (1 + 1e-9)
        # brute force: no rank-r factorisation with a random first part, last part refitted, does better
        for seed in range(20):
            K = randn(r, D, seed=100 + seed)
            assert measured <= output_error(X, W, lstsq_last(X, W, K) @ K) * (1 + 1e-9)
        # nor does the plain SVD's first part with its last part refitted
        assert measured <= output_error(X, W, lstsq_last(X, W, Bp) @ Bp) * (1 + 1e-9)
    A, B = fit.at(min(O, D))
    assert output_error(X, W, A @ B) < 1e-20                                            # full rank: exact


def test_activation_aware_svd_is_much_better_on_anisotropic_inputs():
    O, D, n, r = 16, 16, 1000, 4
    W = randn(O, D, seed=3)
    scales = torch.logspace(1, -2, D, dtype=f64)                                       # input axes 10 ... 0.01
    X = randn(n, D, seed=4) * scales @ torch.linalg.qr(randn(D, D, seed=5))[0]        # rotated: S not diagonal
    S = X.T @ X / n
    A, B = fa.SVDFit(W, S, damp=1e-8).at(r)
    Ap, Bp = fa.SVDFit(W).at(r)
    aware, plain = output_error(X, W, A @ B), output_error(X, W, Ap @ Bp)
    # measured (these seeds): aware 0.0131, plain 0.355: 27x lower; asserted: at least 10x (the brief asks 2x)
    assert plain / aware > 10 and aware < 0.02


def test_refit_last_is_least_squares_on_the_rows():
    O, D, n, R = 7, 10, 300, 4
    W, X, K = randn(O, D, seed=6), correlated(n, D, seed=7), randn(R, D, seed=8)
    S = X.T @ X / n
    last = fa.refit_last(W, K, S, damp=0)
    assert torch.allclose(last, lstsq_last(X, W, K), rtol=0, atol=1e-10)


# ---- relative_error on a convolution ------------------------------------------------------------------------

@pytest.mark.parametrize("stride,padding,dilation", [(2, 1, 1), (1, 2, 2)])
def test_relative_error_is_the_measured_conv_output_error(stride, padding, dilation):
    O, C, kh, kw = 5, 3, 3, 3
    W4 = randn(O, C, kh, kw, seed=9)
    approx4 = W4 + 0.3 * randn(O, C, kh, kw, seed=10)
    x = randn(4, C, 9, 8, seed=11) + 0.5 * randn(4, 1, 9, 8, seed=12)                  # correlated channels
    rows = F.unfold(x, (kh, kw), dilation, padding, stride).transpose(1, 2).reshape(-1, C * kh * kw)
    S = rows.T @ rows / rows.shape[0]
    y = F.conv2d(x, W4, None, stride, padding, dilation)
    ya = F.conv2d(x, approx4, None, stride, padding, dilation)
    measured = float((y - ya).pow(2).sum() / y.pow(2).sum())
    assert fa.relative_error(W4.reshape(O, -1), approx4.reshape(O, -1), S) == pytest.approx(measured, rel=1e-10)
    # without S: the weight-space error
    assert fa.relative_error(W4.reshape(O, -1), approx4.reshape(O, -1)) == \
        pytest.approx(float((W4 - approx4).pow(2).sum() / W4.pow(2).sum()), rel=1e-12)


# ---- spatial --------------------------------------------------------------------------------------------------

def test_spatial_exact_at_the_separable_rank_and_tail_below_it():
    O, C, kh, kw, r = 6, 4, 3, 5, 3
    V, H = randn(r, C, kh, seed=13), randn(r, O, kw, seed=14)
    W4 = torch.einsum("tci,toj->ocij", V, H)                        # a sum of r (vertical x horizontal) terms
    fit = fa.SpatialFit(W4)
    f = fit.at(r)
    assert f.ranks == (r,) and [tuple(w.shape) for w in f.weights] == [(r, C, kh, 1), (O, r, 1, kw)]
    assert torch.allclose(f.composite(), W4.reshape(O, -1), rtol=0, atol=1e-12)
    # on a general W4: the error at rank q is the dropped sigma^2 of the regrouped (C*kh) x (O*kw) matrix
    W4 = randn(O, C, kh, kw, seed=15)
    s2 = torch.linalg.svdvals(W4.permute(1, 2, 0, 3).reshape(C * kh, O * kw)).pow(2)
    fit = fa.SpatialFit(W4)
    assert fit.full_rank == min(C * kh, O * kw)
    for q in range(1, fit.full_rank + 1):
        f = fit.at(q)
        err = float((W4.reshape(O, -1) - f.composite()).pow(2).sum())
        assert err == pytest.approx(float(s2[q:].sum()), rel=1e-10, abs=1e-12)
        # the composite is the product of the two parts: W'[o,c,i,j] = sum_t H[o,t,0,j] V[t,c,i,0]
        Vq, Hq = f.weights
        ref = torch.einsum("tci,otj->ocij", Vq[..., 0], Hq[:, :, 0])
        assert torch.allclose(f.composite(), ref.reshape(O, -1), rtol=0, atol=1e-12)
        assert torch.equal(f.K, fa.spatial_K(Vq, kw))


# ---- tucker ---------------------------------------------------------------------------------------------------

def tucker_w4(O, C, k, a, b, seed, noise=0.0):
    core = randn(a, b, k, k, seed=seed)
    U_out, U_in = randn(O, a, seed=seed + 1), randn(C, b, seed=seed + 2)
    W4 = torch.einsum("abij,oa,cb->ocij", core, U_out, U_in)
    return W4 + noise * W4.std() * randn(O, C, k, k, seed=seed + 3)


def tucker_error(W4, ranks, sweeps=3):
    f = fa.tucker_factors(W4, *ranks, sweeps=sweeps)
    return fa.relative_error(W4.reshape(W4.shape[0], -1), f.composite())


@pytest.mark.parametrize("sweeps", [0, 3])
def test_tucker_exact_on_a_tucker_model(sweeps):
    O, C, k, a, b = 10, 8, 3, 4, 3
    W4 = tucker_w4(O, C, k, a, b, seed=16)
    f = fa.tucker_factors(W4, a, b, sweeps=sweeps)
    assert f.ranks == (a, b)
    assert [tuple(w.shape) for w in f.weights] == [(b, C, 1, 1), (a, b, k, k), (O, a, 1, 1)]
    assert torch.allclose(f.composite(), W4.reshape(O, -1), rtol=0, atol=1e-11)
    # the composite is the product of the three parts
    first, core, last = (w.flatten(2) if w.shape[-1] == 1 else w for w in f.weights)
    ref = torch.einsum("sc,rsij,or->ocij", first[..., 0], core, last[..., 0])
    assert torch.allclose(f.composite(), ref.reshape(O, -1), rtol=0, atol=1e-12)


def test_hooi_never_worse_than_hosvd():
    for seed in range(4):
        W4 = randn(12, 10, 3, 3, seed=20 + seed)
        for ranks in [(4, 3), (6, 5), (3, 7)]:
            assert tucker_error(W4, ranks, sweeps=3) <= tucker_error(W4, ranks, sweeps=0) * (1 + 1e-12)


def test_tucker_matches_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    before = tl.get_backend()
    tl.set_backend("pytorch")
    try:
        def theirs(W4, ranks):
            (core, factors), _ = partial_tucker(W4, rank=list(ranks), modes=[0, 1])
            rec = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
            return float((W4 - rec).pow(2).sum() / W4.pow(2).sum())

        for seed in range(3):
            # at the model's ranks, with noise: the default 3 sweeps are as good as tensorly's HOOI (to tol 1e-4)
            W4 = tucker_w4(16, 12, 3, 8, 8, seed=30 + seed, noise=0.3)
            assert tucker_error(W4, (8, 8)) <= theirs(W4, (8, 8)) * (1 + 1e-6)
            # below them, and on unstructured weights, HOOI run to convergence is
            for W in (W4, randn(12, 10, 3, 3, seed=40 + seed)):
                for ranks in [(4, 3), (6, 5), (3, 7)]:
                    assert tucker_error(W, ranks, sweeps=50) <= theirs(W, ranks) * (1 + 1e-6)
    finally:
        tl.set_backend(before)


# ---- evbmf ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L,M", [(40, 60), (60, 40), (100, 30), (64, 64), (32, 144)])
@pytest.mark.parametrize("rank", [5, 8])
def test_evbmf_finds_the_true_rank(L, M, rank):
    Y = randn(L, rank, seed=L + M) @ randn(rank, M, seed=L * M)
    noise = 0.3 * randn(L, M, seed=rank)
    assert fa.evbmf_rank(Y + noise) == rank
    assert fa.evbmf_rank(noise) == 0                                                   # pure noise: no signal


@pytest.mark.parametrize("L,M", [(100, 100), (60, 120), (120, 60), (50, 200)])
def test_evbmf_threshold_is_the_closed_form(L, M):
    """Unit noise (sigma = 1) with its top singular values replaced by 3T, 2T and c*T, T the EVBMF threshold
    sqrt(M (1 + tau) (1 + alpha / tau)), alpha = L / M <= 1, tau = 2.5129 sqrt(alpha) (Nakajima et al., 2013):
    the value just above T is signal, just below it noise (the noise bulk ends near 0.81 T here)."""
    a = min(L, M) / max(L, M)
    tau = 2.5129 * a ** 0.5
    T = (max(L, M) * (1 + tau) * (1 + a / tau)) ** 0.5
    U, s, Vt = torch.linalg.svd(randn(L, M, seed=L + M), full_matrices=False)
    assert float(s[3]) < 0.85 * T
    for c, rank in ((0.95, 2), (1.05, 3)):
        s2 = s.clone()
        s2[:3] = torch.tensor([3 * T, 2 * T, c * T], dtype=f64)
        assert fa.evbmf_rank((U * s2) @ Vt) == rank


def test_tucker_vbmf_ranks_read_each_unfolding():
    W4 = tucker_w4(24, 20, 3, 5, 4, seed=50, noise=0.02)
    assert fa.tucker_vbmf_ranks(W4) == (5, 4)


# ---- separable ------------------------------------------------------------------------------------------------

def test_separable_exact_at_per_channel_rank_and_tail_below_it():
    O, C, kh, kw, m = 7, 3, 3, 3, 2
    P, Dw = randn(C, O, m, seed=60), randn(C, m, kh * kw, seed=61)
    W4 = torch.einsum("cot,ctk->ock", P, Dw).reshape(O, C, kh, kw)    # W4[:, c] = P_c D_c: rank m per channel
    fit = fa.SeparableFit(W4)
    f = fit.at(m)
    assert [tuple(w.shape) for w in f.weights] == [(C * m, 1, kh, kw), (O, C * m, 1, 1)]
    assert torch.allclose(f.composite(), W4.reshape(O, -1), rtol=0, atol=1e-12)
    W4 = randn(O, C, kh, kw, seed=62)
    s2 = torch.linalg.svdvals(W4.permute(1, 0, 2, 3).reshape(C, O, kh * kw)).pow(2)    # C x min(O, kh*kw)
    fit = fa.SeparableFit(W4)
    assert fit.full_rank == min(O, kh * kw)
    for q in range(1, fit.full_rank + 1):
        f = fit.at(q)
        err = float((W4.reshape(O, -1) - f.composite()).pow(2).sum())
        assert err == pytest.approx(float(s2[:, q:].sum()), rel=1e-10, abs=1e-12)
        # the composite is the product of the parts: W'[o,c,i,j] = sum_t P[o, c*q+t] D[c*q+t, 0, i, j]
        D, P = f.weights
        ref = torch.einsum("octk,ctk->ock", P[:, :, 0, 0].reshape(O, C, q, 1), D.reshape(C, q, kh * kw))
        assert torch.allclose(f.composite(), ref.reshape(O, -1), rtol=0, atol=1e-12)
        assert torch.equal(f.K, fa.separable_K(D, C))
    assert float((W4.reshape(O, -1) - fit.at(fit.full_rank).composite()).abs().max()) < 1e-12


# ---- whitener, with_last --------------------------------------------------------------------------------------

def test_whitener_factors_the_damped_moments():
    X = correlated(50, 6, seed=70)
    S = X.T @ X / 50
    for damp in (0.0, 0.01):
        L, Linv = fa.whitener(S, damp)
        target = S + damp * float(S.diagonal().mean()) * torch.eye(6, dtype=f64)
        assert torch.allclose(L @ L.T, target, rtol=1e-12, atol=1e-12)
        assert torch.equal(L, L.tril())
        assert torch.allclose(L @ Linv, torch.eye(6, dtype=f64), rtol=0, atol=1e-10)


def test_whitener_on_a_dead_input_channel_is_finite():
    X = correlated(50, 6, seed=71)
    X[:, 2] = 0                                                        # a dead input: S singular
    S = X.T @ X / 50
    assert int(torch.linalg.matrix_rank(S)) == 5
    L, Linv = fa.whitener(S, 0.01)
    assert bool(torch.isfinite(Linv).all())
    target = S + 0.01 * float(S.diagonal().mean()) * torch.eye(6, dtype=f64)
    assert torch.allclose(L @ L.T, target, rtol=1e-12, atol=1e-12)
    assert torch.allclose(L @ Linv, torch.eye(6, dtype=f64), rtol=0, atol=1e-9)
    # damp=0 on a singular S falls back to a larger damping (10x, 100x, then 1.0 of mean diag) rather than fail
    L0, Linv0 = fa.whitener(S, 0.0)
    assert bool(torch.isfinite(Linv0).all()) and torch.allclose(L0 @ Linv0, torch.eye(6, dtype=f64), atol=1e-9)


def test_with_last_replaces_the_last_part_in_its_shape():
    W4 = randn(6, 4, 3, 3, seed=72)
    f = fa.SpatialFit(W4).at(2)
    new = randn(6, 2 * 3, seed=73)
    g = fa.with_last(f, new)
    assert g.weights[-1].shape == f.weights[-1].shape and torch.equal(g.weights[-1].reshape(6, 6), new)
    assert torch.equal(g.composite(), new @ f.K) and torch.equal(g.weights[0], f.weights[0])
