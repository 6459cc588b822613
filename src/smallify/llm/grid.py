"""Group-wise integer grids of a Linear weight [out, in]: fitting scale and zero point per group of ``group``
consecutive input columns, rounding onto the grid, and the searches that pick a better range than min-max.

Pure math: tensors in, (scale, zero point) or integers out. Shapes: w (O, I); per-group parameters (O, G)
with G = I // group (per output channel: group = I, G = 1). A grid ``fmt`` is an ``IntFormat``; the value of
an integer q is (q - zero) * scale."""
from __future__ import annotations

import torch

from smallify.quant.primitives import IntFormat


def groups_of(w: torch.Tensor, group: int | None) -> torch.Tensor:
    """(O, I) -> (O, G, g): the weight split into groups of consecutive input columns."""
    out, cols = w.shape
    g = cols if group is None else group
    return w.reshape(out, cols // g, g)


def range_params(lo: torch.Tensor, hi: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that put [lo, hi] (widened to hold 0) on ``fmt``'s grid. A signed grid is
    symmetric about 0 (zero point 0, scale = max|.| / qmax); an unsigned one affine."""
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if fmt.signed:
        scale = torch.maximum(-lo, hi) / fmt.qmax
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / safe) + fmt.qmin, fmt.qmin, fmt.qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 1e-8))
    return scale.float(), zero


def quantize_groups(w3: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Integers of grouped weights (O, G, g) on the grid given per-group (O, G) parameters."""
    q = torch.round(w3 / scale[..., None]) + zero[..., None]
    return q.clamp(fmt.qmin, fmt.qmax)


def dequantize_groups(q3: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q3 - zero[..., None]) * scale[..., None]


def group_error(d3: torch.Tensor, hessian_blocks: torch.Tensor | None,
                importance: torch.Tensor | None = None) -> torch.Tensor:
    """Error of each group (O, G) from the weight difference d3 (O, G, g): the sum of squares (weighted by
    ``importance`` (O, G, g) when given), or with the input second moments ``hessian_blocks`` (G, g, g) =
    X_g^T X_g the output error ||X_g d_g||^2 exactly."""
    if hessian_blocks is None:
        return (d3.pow(2) * importance).sum(-1) if importance is not None else d3.pow(2).sum(-1)
    return torch.einsum("ogi,gij,ogj->og", d3, hessian_blocks, d3)


def minmax(w: torch.Tensor, fmt: IntFormat, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point per group (round to nearest's grid)."""
    w3 = groups_of(w, group)
    return range_params(w3.amin(-1), w3.amax(-1), fmt)


def magnitude_importance(w3: torch.Tensor) -> torch.Tensor:
    """Data-free importance of each weight: |w| + the group's RMS (llama.cpp's k-quant weighting): the error
    of large weights counts more, so the search does not clip the outliers an LLM depends on."""
    return w3.abs() + w3.pow(2).mean(-1, keepdim=True).sqrt()


def search(w: torch.Tensor, fmt: IntFormat, group: int | None, steps: int = 20, min_shrink: float = 0.5,
           hessian_blocks: torch.Tensor | None = None, refits: int = 0,
           importance: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the range [lo, hi] * r for r in ``steps`` points from 1 down to ``min_shrink`` with the least
    error (``group_error``: squared, or output error with ``hessian_blocks``); then ``refits`` rounds of least
    squares: with the integers fixed, the zero point (rounded) and then the scale that minimise the squared
    error, re-rounding in between; every candidate is kept only where it lowers a group's error."""
    w = w.float()
    w3 = groups_of(w, group)
    imp = magnitude_importance(w3) if importance == "magnitude" else None
    lo, hi = w3.amin(-1), w3.amax(-1)
    best_s, best_z = range_params(lo, hi, fmt)
    best_err = group_error(w3 - dequantize_groups(quantize_groups(w3, best_s, best_z, fmt), best_s, best_z),
                           hessian_blocks, imp)
    for r in torch.linspace(1.0, min_shrink, max(steps, 1))[1:].tolist():
        s, z = range_params(lo * r, hi * r, fmt)
        err = group_error(w3 - dequantize_groups(quantize_groups(w3, s, z, fmt), s, z), hessian_blocks, imp)
        better = err < best_err
        best_s, best_z, best_err = torch.where(better, s, best_s), torch.where(better, z, best_z), \
            torch.minimum(err, best_err)
    s, z = best_s, best_z
    for _ in range(refits):
        q3 = quantize_groups(w3, s, z, fmt)
        s, z = _refit(w3, q3, s, z, fmt, imp)
        err = group_error(w3 - dequantize_groups(quantize_groups(w3, s, z, fmt), s, z), hessian_blocks, imp)
        better = err < best_err
        best_s, best_z, best_err = torch.where(better, s, best_s), torch.where(better, z, best_z), \
            torch.minimum(err, best_err)
    return best_s, best_z


def _refit(w3: torch.Tensor, q3: torch.Tensor, s: torch.Tensor, z: torch.Tensor, fmt: IntFormat,
           imp: torch.Tensor | None = None):
    """(Weighted) least squares w ~ s * (q - z) for fixed integers q: the affine fit w ~ a*q + b gives s = a
    and the zero point z = round(-b / a) (kept on the grid; 0 on a signed grid), then s is refitted for z."""
    c_w = torch.ones_like(w3) if imp is None else imp
    if not fmt.signed:
        tot = c_w.sum(-1, keepdim=True)
        qm, wm = (c_w * q3).sum(-1, keepdim=True) / tot, (c_w * w3).sum(-1, keepdim=True) / tot
        var = (c_w * (q3 - qm).pow(2)).sum(-1)
        a = (c_w * (q3 - qm) * (w3 - wm)).sum(-1) / var.clamp_min(1e-12)
        b = wm.squeeze(-1) - a * qm.squeeze(-1)
        ok = (var > 0) & (a > 0)
        z_new = torch.clamp(torch.round(-b / torch.where(ok, a, torch.ones_like(a))), fmt.qmin, fmt.qmax)
        z = torch.where(ok, z_new.to(torch.int32), z)
    c = q3 - z[..., None]
    den = (c_w * c.pow(2)).sum(-1)
    s_new = (c_w * w3 * c).sum(-1) / den.clamp_min(1e-12)
    s = torch.where((den > 0) & (s_new > 0), s_new, s)
    return s.float(), z


def integers(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: IntFormat,
             group: int | None) -> torch.Tensor:
    """The integers (O, I) of ``w`` on the per-group grid."""
    return quantize_groups(groups_of(w.float(), group), scale, zero, fmt).reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int | None) -> torch.Tensor:
    return dequantize_groups(groups_of(q.float(), group), scale, zero).reshape(q.shape)
