"""GPTQ (Frantar et al. 2022) on one weight: columns rounded one at a time, each rounding error spread over
the columns not yet rounded through the Cholesky factor of the inverse Hessian.

Pure math: w (O, I) and H = X^T X (I, I) in, integers and per-group grids out. Groups stay contiguous input
columns (the layout every runtime reads); with ``act_order`` the columns are visited by descending diag(H)
and a group's grid is fitted when its first column comes up, on the weights as updated so far."""
from __future__ import annotations

from collections.abc import Callable

import torch

from smallify.llm import grid
from smallify.quant.primitives import IntFormat

# fit(w (O, g'), hessian blocks or None) -> (scale (O, 1), zero (O, 1)): the grid of one group
GroupFit = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def damped_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, damping raised until H is positive definite."""
    n = h.shape[0]
    mean_diag = float(torch.diag(h).mean()) or 1.0
    for factor in (1.0, 10.0, 100.0, 1000.0):
        hd = h + torch.eye(n, dtype=h.dtype) * damp * factor * mean_diag
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True)
    raise ValueError("the Hessian stays singular after damping")


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: IntFormat, group: int | None, fit: GroupFit,
         act_order: bool = True, damp: float = 0.01, block_size: int = 128
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integers (O, I), scale (O, G), zero (O, G)) of ``w`` quantized by GPTQ with input Hessian ``h``."""
    w = w.detach().float().clone()
    h = h.detach().double().clone()
    out, cols = w.shape
    g = cols if group is None else group
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    u = damped_inverse_factor(h, damp).float()
    n_groups = cols // g
    scale = torch.zeros(out, n_groups, dtype=torch.float32)
    zero = torch.zeros(out, n_groups, dtype=torch.int32)
    fitted = torch.zeros(n_groups, dtype=torch.bool)
    position = torch.empty(cols, dtype=torch.long)
    position[perm] = torch.arange(cols)          # original column -> its place in the visiting order
    q_out = torch.zeros(out, cols, dtype=torch.float32)
    h_orig = h  # permuted Hessian, for group grids weighted by the output error
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            gi = col // g
            if not fitted[gi]:
                places = position[gi * g:(gi + 1) * g]
                current = w[:, places].clone()
                inside = (places >= i1) & (places < i2)
                current[:, inside] = w1[:, places[inside] - i1]
                hb = h_orig[places][:, places].float()[None]
                s, z = fit(current.float(), hb)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
                fitted[gi] = True
            s, z = scale[:, gi], zero[:, gi].float()
            x = w1[:, i]
            q = torch.clamp(torch.round(x / s) + z, fmt.qmin, fmt.qmax)
            deq = (q - z) * s
            q_out[:, i1 + i] = q
            d = u[i1 + i, i1 + i]
            e = (x - deq) / d
            w1[:, i:] -= e[:, None] * u[i1 + i, i1 + i:i2][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    q = torch.empty_like(q_out)
    q[:, perm] = q_out
    return q.to(torch.int32), scale, zero


def search_fit(fmt: IntFormat, steps: int = 20) -> GroupFit:
    """Group grids by ``grid.search`` weighted by the group's Hessian block (the output error)."""
    def fit(w: torch.Tensor, hessian_blocks: torch.Tensor | None):
        return grid.search(w, fmt, None, steps=steps, hessian_blocks=hessian_blocks)
    return fit


def minmax_fit(fmt: IntFormat) -> GroupFit:
    def fit(w: torch.Tensor, hessian_blocks: torch.Tensor | None):
        return grid.minmax(w, fmt, None)
    return fit
