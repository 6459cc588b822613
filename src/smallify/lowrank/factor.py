"""The math of low-rank decomposition: one weight, one factorization, its error. Pure tensors, no modules.

Every form here writes a layer's weight ``W`` (O x D, D = C*kh*kw: one row per output channel, one column per
input patch value, in ``torch.nn.functional.unfold`` order) as ``last @ K``: the first part(s) of the decomposed
layer map a patch to R features (``K``, R x D), the last part is a 1x1 / Linear map from those R features to the
O outputs (``last``, O x R). That one shape gives every method the same two data-aware steps:

- the error of a factorization on the data is ``trace(dW S dW^T) / trace(W S W^T)``, with ``S`` the second-moment
  matrix of the layer's input patches (D x D); without data S = I (the weight-space error);
- ``refit_last`` solves the last part by least squares on the data given the first part(s) (closed form from S).

Forms (``W4``: the conv weight O x C x kh x kw; a Linear is O x D):
- ``svd``: W = A B, rank r (Linear, or a 1x1 conv). With S, activation-aware: the SVD of W L where L L^T = S
  (SVD-LLM's whitening), truncated, mapped back: the truncation error is then exactly the output error.
- ``spatial``: kh x kw -> (kh x 1, r channels) then (1 x kw) (Jaderberg et al.): the SVD of W4 regrouped as
  (C*kh) x (O*kw).
- ``tucker``: 1x1 (C -> r_in), kh x kw core (r_in -> r_out), 1x1 (r_out -> O): Tucker-2 by HOSVD + HOOI sweeps.
- ``separable``: depthwise kh x kw (m filters per input channel) then pointwise 1x1: per input channel the best
  rank-m split of W4[:, c] (O x kh*kw).
"""
from __future__ import annotations

import dataclasses
import math

import torch

METHODS = ("svd", "spatial", "tucker", "separable")


@dataclasses.dataclass
class Factors:
    """One factorization of ``W`` (O x D): ``weights`` are the decomposed layer's parts in order (conv weights
    4-D, Linear weights 2-D); ``K`` (R x D) and ``last`` (O x R) the composite view, W ~= last @ K."""

    method: str
    ranks: tuple[int, ...]
    weights: list[torch.Tensor]
    K: torch.Tensor
    last: torch.Tensor

    def composite(self) -> torch.Tensor:
        return self.last @ self.K


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(m.double(), full_matrices=False)


def whitener(S: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1) with L L^T = S + damp * mean(diag S) * I (lower triangular): the input whitening of
    activation-aware SVD. The damping keeps L invertible when inputs are correlated or dead."""
    S = S.double()
    eye = torch.eye(S.shape[0], dtype=S.dtype)
    scale = float(S.diagonal().mean()) or 1.0
    for extra in (damp, max(10 * damp, 1e-6), max(100 * damp, 1e-4), 1.0):
        L, info = torch.linalg.cholesky_ex(S + extra * scale * eye)
        if int(info) == 0:
            return L, torch.linalg.solve_triangular(L, eye, upper=False)
    raise ValueError("the input second-moment matrix is not positive definite even after damping")


def relative_error(W: torch.Tensor, approx: torch.Tensor, S: torch.Tensor | None = None) -> float:
    """||dW||^2 / ||W||^2, with S the data's patch second moments: the output error's share of the output
    energy (the bias cancels)."""
    W, d = W.double(), (W.double() - approx.double())
    if S is None:
        return float(d.pow(2).sum() / W.pow(2).sum().clamp_min(1e-300))
    S = S.double()
    return float(torch.einsum("od,de,oe->", d, S, d) / torch.einsum("od,de,oe->", W, S, W).clamp_min(1e-300))


def refit_last(W: torch.Tensor, K: torch.Tensor, S: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """The last part (O x R) that minimises the output error on the data given the first part(s) K (R x D):
    last = W S K^T (K S K^T + damp*I)^-1 (ordinary least squares on the layer's inputs, from their moments)."""
    W, K, S = W.double(), K.double(), S.double()
    G = K @ S @ K.T
    G = G + damp * float(G.diagonal().mean().clamp_min(1e-300)) * torch.eye(G.shape[0], dtype=G.dtype)
    rhs = W @ S @ K.T
    return torch.linalg.solve(G, rhs.T).T


# ---- svd -------------------------------------------------------------------------------------------------

class SVDFit:
    """W (O x D) ~= A B at any rank from one SVD; with ``S``, of the whitened W L (activation-aware)."""

    def __init__(self, W: torch.Tensor, S: torch.Tensor | None = None, damp: float = 0.01):
        self.W = W.double().reshape(W.shape[0], -1)
        self.Linv = None
        if S is not None:
            L, self.Linv = whitener(S, damp)
            self.U, self.s, self.Vt = _svd(self.W @ L)
        else:
            self.U, self.s, self.Vt = _svd(self.W)

    @property
    def full_rank(self) -> int:
        return min(self.W.shape)

    def tail_error(self, r: int) -> float:
        """The relative error at rank r: the share of the (whitened) energy the dropped singular values hold."""
        e = self.s.pow(2)
        return float(e[r:].sum() / e.sum().clamp_min(1e-300))

    def at(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (O x r), B (r x D)), the singular values split evenly between them (so both parts have similar
        ranges: what a per-channel INT8 grid wants afterwards)."""
        root = self.s[:r].sqrt()
        A = self.U[:, :r] * root
        B = root[:, None] * self.Vt[:r]
        if self.Linv is not None:
            B = B @ self.Linv
        return A, B


def svd_factors(W: torch.Tensor, r: int, S: torch.Tensor | None = None, fit: SVDFit | None = None) -> Factors:
    """Linear (O x D) or 1x1 conv (O x C x 1 x 1) weight -> two parts of rank r."""
    fit = fit or SVDFit(W, S)
    A, B = fit.at(r)
    if W.ndim == 4:
        return Factors("svd", (r,), [B.reshape(r, -1, 1, 1), A.reshape(A.shape[0], r, 1, 1)], B, A)
    return Factors("svd", (r,), [B, A], B, A)


# ---- spatial (k x 1 then 1 x k) ----------------------------------------------------------------------------

class SpatialFit:
    """W4 (O x C x kh x kw) ~= H * V: V (r x C x kh x 1), H (O x r x 1 x kw), from one SVD of W4 regrouped as
    M[(c, i), (o, j)] = W4[o, c, i, j] (the best such pair in weight space)."""

    def __init__(self, W4: torch.Tensor):
        self.W4 = W4.double()
        O, C, kh, kw = W4.shape
        self.U, self.s, self.Vt = _svd(self.W4.permute(1, 2, 0, 3).reshape(C * kh, O * kw))

    @property
    def full_rank(self) -> int:
        return int(self.s.numel())

    def at(self, r: int) -> Factors:
        O, C, kh, kw = self.W4.shape
        root = self.s[:r].sqrt()
        V = (self.U[:, :r] * root).T.reshape(r, C, kh, 1)
        H = (root[:, None] * self.Vt[:r]).reshape(r, O, kw).permute(1, 0, 2).reshape(O, r, 1, kw)
        return Factors("spatial", (r,), [V, H], spatial_K(V, kw), H.reshape(O, r * kw))


def spatial_K(V: torch.Tensor, kw: int) -> torch.Tensor:
    """K[(r, j), (c, i, j')] = V[r, c, i] * (j == j'): the patch -> features map of the vertical part."""
    r, C, kh, _ = V.shape
    eye = torch.eye(kw, dtype=V.dtype)
    return torch.einsum("rci,jk->rjcik", V[..., 0], eye).reshape(r * kw, C * kh * kw)


# ---- tucker-2 --------------------------------------------------------------------------------------------

def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    return _svd(m)[0][:, :r]


def tucker_bases(W4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The left singular vectors of W4's output- and input-channel unfoldings (HOSVD's start at every rank)."""
    O, C = W4.shape[:2]
    W = W4.double()
    return _svd(W.reshape(O, -1))[0], _svd(W.transpose(0, 1).reshape(C, -1))[0]


def tucker_factors(W4: torch.Tensor, r_out: int, r_in: int, sweeps: int = 3, tol: float = 1e-7,
                   bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> Factors:
    """Tucker-2 of W4 (O x C x kh x kw): U_out (O x r_out), core (r_out x r_in x kh x kw), U_in (C x r_in); HOSVD
    start, then up to ``sweeps`` of higher-order orthogonal iteration, each lowering the weight-space error,
    stopped early once a sweep gains less than ``tol`` of the weight's energy. ``bases``: ``tucker_bases(W4)``,
    computed once when many ranks of one weight are tried."""
    W = W4.double()
    O, C, kh, kw = W.shape
    B_out, B_in = bases if bases is not None else tucker_bases(W)
    U_out, U_in = B_out[:, :r_out], B_in[:, :r_in]
    total, kept = float(W.pow(2).sum()) or 1.0, 0.0
    for _ in range(sweeps):
        proj = torch.einsum("ocij,cr->orij", W, U_in)                 # W x_1 U_in^T
        U_out = _leading(proj.reshape(O, -1), r_out)
        proj = torch.einsum("ocij,or->rcij", W, U_out)                # W x_0 U_out^T
        U, s, _ = _svd(proj.transpose(0, 1).reshape(C, -1))
        U_in = U[:, :r_in]
        now = float(s[:r_in].pow(2).sum())                             # the core's energy = total - error
        if now - kept < tol * total:
            break
        kept = now
    core = torch.einsum("ocij,or,cs->rsij", W, U_out, U_in)
    first = U_in.T.reshape(r_in, C, 1, 1)
    K = torch.einsum("rsij,cs->rcij", core, U_in).reshape(r_out, C * kh * kw)
    return Factors("tucker", (r_out, r_in), [first, core, U_out.reshape(O, r_out, 1, 1)], K, U_out)


def evbmf_rank(Y: torch.Tensor) -> int:
    """The rank that empirical variational Bayesian matrix factorisation (Nakajima et al., 2013) keeps for Y:
    the noise variance is the minimiser of the EVB free energy, every singular value above the resulting
    threshold is signal. Used for Tucker ranks (one unfolding per mode), as in the CNN decomposition papers."""
    Y = Y.double()
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    s = torch.linalg.svdvals(Y)
    H = L
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    s2 = s.pow(2)
    residual = max(float(Y.pow(2).sum() - s2.sum()), 0.0)
    eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = float((s2.sum() + residual) / (L * M))
    lower = max(float(s2[eh_ub + 1] / (M * x_bar)) if eh_ub + 1 < H else 0.0,
                float(s2[eh_ub + 1:].mean() / M) if eh_ub + 1 < H else 0.0, upper * 1e-12)

    def free_energy(sigma2: float) -> float:
        x = s2 / (M * sigma2)
        big, small = x[x > x_bar], x[x <= x_bar]
        tau = 0.5 * (big - (1 + alpha) + torch.sqrt((big - (1 + alpha)).pow(2) - 4 * alpha))
        value = (small - torch.log(small)).sum() + (big - tau).sum() + torch.log((tau + 1) / big).sum() \
            + alpha * torch.log(tau / alpha + 1).sum()
        return float(value) + residual / (M * sigma2) + (L - H) * math.log(sigma2)

    # golden-section search on log(sigma2) over [lower, upper]
    a, b = math.log(lower), math.log(max(upper, lower * (1 + 1e-9)))
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = free_energy(math.exp(c)), free_energy(math.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = free_energy(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = free_energy(math.exp(d))
    sigma2 = math.exp((a + b) / 2)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int((s > threshold).sum())


def tucker_vbmf_ranks(W4: torch.Tensor) -> tuple[int, int]:
    """(r_out, r_in) by EVBMF on the output- and input-channel unfoldings of W4 (at least 1 each)."""
    O, C = W4.shape[:2]
    return (max(1, evbmf_rank(W4.reshape(O, -1))), max(1, evbmf_rank(W4.transpose(0, 1).reshape(C, -1))))


# ---- separable (depthwise then pointwise) ----------------------------------------------------------------

class SeparableFit:
    """W4 (O x C x kh x kw) ~= pointwise(depthwise): per input channel c, the best rank-m split of W4[:, c]
    (O x kh*kw) gives m depthwise filters and their pointwise columns."""

    def __init__(self, W4: torch.Tensor):
        self.W4 = W4.double()
        O, C, kh, kw = W4.shape
        self.U, self.s, self.Vt = _svd(self.W4.permute(1, 0, 2, 3).reshape(C, O, kh * kw))   # batched over c

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[1])

    def at(self, m: int) -> Factors:
        O, C, kh, kw = self.W4.shape
        root = self.s[:, :m].sqrt()                                    # C x m
        D = (root[..., None] * self.Vt[:, :m]).reshape(C * m, 1, kh, kw)
        P = (self.U[:, :, :m] * root[:, None, :]).permute(1, 0, 2).reshape(O, C * m)
        return Factors("separable", (m,), [D, P.reshape(O, C * m, 1, 1)], separable_K(D, C), P)


def separable_K(D: torch.Tensor, C: int) -> torch.Tensor:
    """K[(c, t), (c', i, j)] = D[c*m + t, i, j] * (c == c'): the patch -> features map of the depthwise part."""
    Cm, _, kh, kw = D.shape
    m = Cm // C
    eye = torch.eye(C, dtype=D.dtype)
    return torch.einsum("ctk,cd->ctdk", D.reshape(C, m, kh * kw), eye).reshape(C * m, C * kh * kw)


def with_last(f: Factors, last: torch.Tensor) -> Factors:
    """``f`` with its last part replaced (after ``refit_last``), in the last part's own shape."""
    shape = f.weights[-1].shape
    return dataclasses.replace(f, weights=f.weights[:-1] + [last.reshape(shape)], last=last)
