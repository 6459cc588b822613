"""The math of weight sharing: codebooks for rows of weights, batched over rows.

Every function takes ``x`` as (R, N) float32: R rows, each with its own codebook, nothing looped over rows.

- ``kmeans_1d``: weighted 1-D Lloyd's algorithm (Deep Compression). The values of each row are sorted once;
  in 1-D a cluster is an interval between the midpoints of the sorted centroids, so one iteration is a
  ``searchsorted`` of k-1 midpoints plus prefix sums: O(k log N) per row after an O(N log N) sort.
- ``optimal_1d``: the exact optimum of weighted 1-D k-means by dynamic programming (small n: a reference).
- ``assign``: nearest centroid per entry (ties to the lower index), for any (even unsorted) codebook.
- ``binary_fit`` (BWN), ``ternary_fit`` (TWN), ``ternary_optimal`` (exact), ``power_of_two_fit``: structured
  codebooks as a per-row ``scale`` (R, 1) times fixed ``levels`` (``BINARY_LEVELS``, ``TERNARY_LEVELS``,
  ``power_of_two_levels(bits)``).
- ``reconstruct`` (a gather) and ``sqnr_db``.

``mask`` (R, N) bool, where given, names the entries that take part (e.g. the nonzeros of a pruned weight):
the others count for nothing and get index 0 (k-means, binary) or the index of the level 0 (ternary, power of
two, so that their reconstruction is exactly 0).
"""
from __future__ import annotations

import torch

from smallify.errors import ConfigError, DataError

INITS = ("linear", "density", "kmeans++")
BINARY_LEVELS = (-1.0, 1.0)
TERNARY_LEVELS = (-1.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- checks
def _check_x(x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or not x.is_floating_point():
        what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"x is {what}; accepted: a {ndim}-D floating-point tensor")
    if not torch.isfinite(x).all():
        raise DataError("x holds NaN or infinite values; accepted: finite values only")
    return x.detach().float()


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 256:
        raise ConfigError(f"k={k!r} is not supported; accepted: an integer 2..256")
    return k


def _check_weights(weights, x: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.ones_like(x)
    if not isinstance(weights, torch.Tensor) or weights.shape != x.shape:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise DataError(f"weights has shape {got}; accepted: x's shape {tuple(x.shape)}")
    w = weights.detach().float()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise DataError("weights holds negative, NaN or infinite values; accepted: finite values >= 0")
    return w


def _check_mask(mask, x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.shape != x.shape or mask.dtype != torch.bool:
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DataError(f"mask is {got}; accepted: a bool tensor of x's shape {tuple(x.shape)}")
    return mask


# ---------------------------------------------------------------------------------------------- helpers
def reconstruct(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(R, k) codebook, (R, N) indices (any integer dtype) -> (R, N) values: ``codebook[r, indices[r, n]]``."""
    return codebook.gather(1, indices.long())


def sqnr_db(x: torch.Tensor, xhat: torch.Tensor) -> float:
    """10 log10(sum x^2 / sum (x - xhat)^2) over all entries; inf when xhat == x."""
    x64, e64 = x.double(), (x.double() - xhat.double())
    noise = float((e64 * e64).sum())
    signal = float((x64 * x64).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise, dtype=torch.float64)).item()


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every entry of x (R, N) among centroids (R, k) -> (R, N) int64.

    Exact: the midpoints are formed in float64 (exact for float32 values), so x sits at a midpoint only when it
    is exactly as far from both; ties go to the lower index. The codebook need not be sorted (a fine-tuned one
    may not be); among equal centroids the lowest index is chosen."""
    x = _check_x(x)
    c = centroids.detach().double()
    if c.ndim != 2 or c.shape[0] != x.shape[0]:
        raise DataError(f"centroids has shape {tuple(c.shape)}; accepted: ({x.shape[0]}, k)")
    cs, perm = torch.sort(c, dim=1, stable=True)                         # (R, k)
    first = torch.searchsorted(cs, cs)                                   # first position of each value's run
    orig = perm.gather(1, first)                                         # lowest original index of that value
    k = c.shape[1]
    if k == 1:
        return torch.zeros(x.shape, dtype=torch.int64)
    mid = (cs[:, 1:] + cs[:, :-1]) / 2                                   # (R, k-1)
    xd = x.double()
    pos = torch.searchsorted(mid, xd)                                    # mids < x: sorted position of nearest
    idx = orig.gather(1, pos)
    tie = (pos < k - 1) & (xd == mid.gather(1, pos.clamp(max=k - 2)))    # exactly halfway to the next one up
    if tie.any():
        up = orig.gather(1, (pos + 1).clamp(max=k - 1))
        idx = torch.where(tie, torch.minimum(idx, up), idx)
    return idx


def _pick(cw: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative weight cw (R, N) reaches u (R, m) (only positions with
    positive weight can be chosen when u > 0)."""
    return torch.searchsorted(cw, u).clamp(max=cw.shape[1] - 1)


def _init(xs: torch.Tensor, ws: torch.Tensor, k: int, init: str, seed: int) -> torch.Tensor:
    """Initial centroids (R, k) float64 from the sorted values xs (R, N) and their weights ws (zero: ignored)."""
    R = xs.shape[0]
    live = ws > 0
    has = live.any(1, keepdim=True)
    lo = torch.where(live, xs, torch.inf).amin(1, keepdim=True)
    hi = torch.where(live, xs, -torch.inf).amax(1, keepdim=True)
    lo, hi = torch.where(has, lo, 0.0), torch.where(has, hi, 0.0)
    if init == "linear":
        t = torch.linspace(0, 1, k, dtype=torch.float64)
        return lo + (hi - lo) * t
    cw = ws.cumsum(1)                                                    # (R, N)
    total = cw[:, -1:]
    if init == "density":
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        c = xs.gather(1, _pick(cw, q * total))
        return torch.where(has, c, lo)
    # kmeans++: the first centroid drawn by weight, each next by weight x squared distance to the nearest one
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(R, k, generator=g, dtype=torch.float64)
    c = torch.empty(R, k, dtype=torch.float64)
    c[:, 0] = xs.gather(1, _pick(cw, u[:, :1] * total))[:, 0]
    d2 = (xs - c[:, :1]) ** 2
    for j in range(1, k):
        p = (ws * d2).cumsum(1)
        pt = p[:, -1:]
        spread = pt > 0                                                  # else: every point is a centroid already
        cj = torch.where(spread, xs.gather(1, _pick(p, u[:, j:j + 1] * pt)),
                         xs.gather(1, _pick(cw, u[:, j:j + 1] * total)))
        c[:, j] = cj[:, 0]
        d2 = torch.minimum(d2, (xs - cj) ** 2)
    return torch.where(has, c.sort(1).values, lo)


def _reseed(xs: torch.Tensor, ws: torch.Tensor, c: torch.Tensor, b: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Move each empty cluster's centroid onto a point of largest weighted error in its row (the j-th empty
    cluster onto the j-th largest error), where that error is > 0; every move lowers the SSE, so Lloyd's
    algorithm still ends. Rows with fewer distinct values than k keep their duplicates."""
    R, N = xs.shape
    pos = torch.arange(N).repeat(R, 1)
    cid = torch.searchsorted(b[:, 1:-1].contiguous(), pos, right=True)   # cluster of each sorted position
    err = ws * (xs - c.gather(1, cid)) ** 2                              # (R, N)
    top = err.topk(min(c.shape[1], N), dim=1)
    rank = (empty.cumsum(1) - 1).clamp(0, top.values.shape[1] - 1)      # j-th empty cluster -> j-th worst point
    worst = top.values.gather(1, rank)
    return torch.where(empty & (worst > 0), xs.gather(1, top.indices.gather(1, rank)), c)


def kmeans_1d(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, init: str = "linear",
              iters: int = 30, seed: int = 0, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means per row: x (R, N) -> (centroids (R, k) float32 ascending, indices (R, N) int64).

    Minimizes sum weights * (x - centroid)^2 over the entries in ``mask``, by Lloyd's algorithm from ``init``:
    'linear' (k values evenly spaced between the row's min and max: Deep Compression's choice), 'density' (the
    row's weighted quantiles at (i + 0.5) / k) or 'kmeans++' (D^2 sampling with ``seed``). At most ``iters``
    iterations; it stops once no assignment changes. An empty cluster is re-seeded at the point of largest
    weighted error of its row (where that error is > 0; else it keeps its centroid): rows with fewer distinct
    values than k get duplicate centroids and error 0. Entries outside ``mask`` get index 0; the others
    ``assign(x, centroids)`` (nearest, ties to the lower index). Rows are independent, except that 'kmeans++'
    draws all rows' samples from one generator (a row's draw depends on R)."""
    x = _check_x(x)
    k = _check_k(k)
    if init not in INITS:
        raise ConfigError(f"init={init!r} is not supported; accepted: {', '.join(map(repr, INITS))}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"iters={iters!r} is not supported; accepted: an integer >= 0")
    m = _check_mask(mask, x)
    w = _check_weights(weights, x) * m
    R, N = x.shape
    if N == 0:
        return torch.zeros(R, k), torch.zeros(R, 0, dtype=torch.int64)
    xs, order = torch.sort(x, dim=1)
    xs = xs.double()                                                      # (R, N)
    ws = w.gather(1, order).double()                                      # (R, N)
    c = _init(xs, ws, k, init, seed)                                      # (R, k) float64
    zero = torch.zeros(R, 1, dtype=torch.float64)
    cw = torch.cat([zero, ws.cumsum(1)], 1)                               # (R, N+1) prefix sums
    cwx = torch.cat([zero, (ws * xs).cumsum(1)], 1)
    edge0, edgeN = torch.zeros(R, 1, dtype=torch.int64), torch.full((R, 1), N, dtype=torch.int64)
    bounds = None
    for _ in range(iters):
        mid = (c[:, 1:] + c[:, :-1]) / 2                                  # (R, k-1)
        b = torch.cat([edge0, torch.searchsorted(xs, mid, right=True), edgeN], 1)   # cluster j: xs[b[j]:b[j+1]]
        if bounds is not None and torch.equal(b, bounds):
            break
        bounds = b
        wsum = cw.gather(1, b[:, 1:]) - cw.gather(1, b[:, :-1])           # (R, k)
        xsum = cwx.gather(1, b[:, 1:]) - cwx.gather(1, b[:, :-1])
        c = torch.where(wsum > 0, xsum / wsum.clamp(min=1e-300), c)
        empty = wsum == 0
        if empty.any():
            c = _reseed(xs, ws, c, b, empty)
        c = c.sort(1).values
    centroids = c.float().sort(1).values
    indices = assign(x, centroids)
    return centroids, torch.where(m, indices, 0)


def optimal_1d(x: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact optimum of weighted 1-D k-means for one row x (n,): (centroids (k,) float32 ascending,
    indices (n,) int64). Dynamic programming over the sorted values (an optimal cluster is a contiguous run of
    them): O(k n^2) time and O(n^2) memory, for small n (a reference for tests). With fewer than k clusters
    needed the last centroid repeats."""
    x = _check_x(x, ndim=1)
    k = _check_k(k)
    w = _check_weights(weights, x)
    n = x.shape[0]
    if n == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.int64)
    xs, order = torch.sort(x)
    xs, ws = xs.double(), w[order].double()
    z = torch.zeros(1, dtype=torch.float64)
    W, S1, S2 = (torch.cat([z, v.cumsum(0)]) for v in (ws, ws * xs, ws * xs * xs))   # (n+1,)
    # cost[i, j]: weighted SSE of xs[i:j] about its weighted mean (i < j), inf for i >= j
    dw, d1, d2 = W[None] - W[:, None], S1[None] - S1[:, None], S2[None] - S2[:, None]
    cost = (d2 - d1 * d1 / dw.clamp(min=1e-300)).clamp(min=0)
    cost = torch.where(dw > 0, cost, 0.0)
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    cost = torch.where(i < j, cost, torch.inf)
    best = torch.full((n + 1,), torch.inf, dtype=torch.float64)
    best[0] = 0.0                                                       # best[j]: optimum of xs[:j] in m clusters
    back = []
    for _ in range(min(k, n)):
        total = best[:, None] + cost                                    # (i, j)
        cand, arg = total.min(0)
        keep = best <= cand                                             # fewer clusters do at least as well
        back.append(torch.where(keep, -1, arg))
        best = torch.minimum(best, cand)
    # walk back from j = n
    cuts, j, m = [], n, len(back) - 1
    while j > 0:
        while back[m][j] == -1:
            m -= 1
        i = int(back[m][j])
        cuts.append((i, j))
        j, m = i, m - 1
    cuts.reverse()
    cents, idx_sorted = [], torch.empty(n, dtype=torch.int64)
    for t, (i, j) in enumerate(cuts):
        wsum = float(W[j] - W[i])
        cents.append(float(S1[j] - S1[i]) / wsum if wsum > 0 else float(xs[i:j].mean()))
        idx_sorted[i:j] = t
    cents += [cents[-1]] * (k - len(cents))
    indices = torch.empty(n, dtype=torch.int64)
    indices[order] = idx_sorted
    return torch.tensor(cents, dtype=torch.float32), indices


# ---------------------------------------------------------------------------------------------- structured
def binary_fit(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BWN: levels ``BINARY_LEVELS`` (-1, +1); x (R, N) -> (scale (R, 1), indices (R, N) int64: 1 where x >= 0).
    scale = mean |x| over the row (the closed-form minimizer of ||x - scale * sign(x)||^2)."""
    x = _check_x(x)
    m = _check_mask(mask, x)
    count = m.sum(1, keepdim=True).clamp(min=1)
    scale = (x.abs() * m).sum(1, keepdim=True) / count
    return scale, torch.where(m, (x >= 0).long(), 0)


def _ternary_indices(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, torch.where(x > 0, 2, 0), 1).long()


def ternary_fit(x: torch.Tensor, threshold: float = 0.7,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN: levels ``TERNARY_LEVELS`` (-1, 0, +1) at indices 0, 1, 2; x (R, N) -> (scale (R, 1), indices).
    delta = threshold * mean |x|; entries with |x| > delta take ±1, the others 0; scale = mean |x| over those
    kept (0 for a row that keeps none)."""
    x = _check_x(x)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ConfigError(f"threshold={threshold!r} is not supported; accepted: a number > 0, e.g. 0.7")
    m = _check_mask(mask, x)
    a = x.abs() * m
    delta = threshold * a.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    keep = (a > delta) & m
    scale = (a * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
    return scale, _ternary_indices(x, keep)


def ternary_optimal(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact least-squares ternary fit, same outputs as ``ternary_fit``: keeping the m largest |x| with
    scale = their mean leaves sum x^2 - (sum of the top m)^2 / m, so the best m maximizes (top-m sum)^2 / m."""
    x = _check_x(x)
    m = _check_mask(mask, x)
    a = (x.abs() * m).double()
    top, order = torch.sort(a, dim=1, descending=True)                   # (R, N)
    s = top.cumsum(1)
    count = torch.arange(1, x.shape[1] + 1, dtype=torch.float64)
    best = (s * s / count).argmax(1, keepdim=True)                       # m - 1, (R, 1)
    scale = (s.gather(1, best) / (best + 1)).float()
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1]).expand_as(order))
    keep = (rank <= best) & m & (a > 0)
    return scale, _ternary_indices(x, keep)


def power_of_two_levels(bits: int) -> torch.Tensor:
    """The 2^bits - 1 levels, ascending: 0 and ±2^-j for j = 0 .. 2^(bits-1) - 2 (bits=3: 0, ±1/4, ±1/2, ±1).
    The level 0 sits at index 2^(bits-1) - 1."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits={bits!r} is not supported; accepted: an integer 2..8")
    n = 2 ** (bits - 1) - 1
    mags = torch.pow(2.0, -torch.arange(n - 1, -1, -1, dtype=torch.float64)).float()   # 2^-(n-1) .. 1
    return torch.cat([-mags.flip(0), torch.zeros(1), mags])


def power_of_two_fit(x: torch.Tensor, bits: int,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logarithmic quantization: x (R, N) -> (scale (R, 1), levels (L,) = ``power_of_two_levels(bits)``,
    indices (R, N) int64). scale is a power of two per row: of the two nearest the row's max |x| (2^floor and
    2^ceil of log2), the one with the lower SSE; each entry takes the nearest of scale * levels. Every
    reconstructed value scale * level is exactly 0 or ±2^e."""
    levels = power_of_two_levels(bits)
    x = _check_x(x)
    m = _check_mask(mask, x)
    zero_at = (levels.numel() - 1) // 2
    amax = (x.abs() * m).amax(1, keepdim=True) if x.shape[1] else torch.zeros(x.shape[0], 1)
    _, e = torch.frexp(amax)                                             # amax = f * 2^e, f in [0.5, 1)
    best = None
    for exp in (e - 1, e):                                               # 2^floor(log2 amax), 2^ceil (or above)
        scale = torch.ldexp(torch.ones_like(amax), exp)
        scale = torch.where(amax > 0, scale, 1.0)
        codebook = scale * levels                                        # (R, L): exact products
        idx = torch.where(m, assign(x, codebook), zero_at)
        err = ((x - reconstruct(codebook, idx)).double() ** 2).sum(1, keepdim=True)
        if best is None:
            best = (scale, idx, err)
        else:
            better = err < best[2]
            best = (torch.where(better, scale, best[0]), torch.where(better, idx, best[1]),
                    torch.minimum(err, best[2]))
    return best[0], levels, best[1]
