"""AWQ (Lin et al. 2023): input-channel scales that protect the weights salient to the activations, folded
into the op producing the input, and the search of each group's clipping range.

``search_scale`` is pure math on second moments; ``find_producer`` and ``fold`` do the module surgery. The
producer of a group's input is found numerically, not from an architecture list: a candidate (a norm with a
per-channel weight, or a Linear with as many outputs as the group has inputs) qualifies when scaling its
output channels by r scales the group's input by exactly r and the block's output stays the same once the
group's weights are divided by r."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from smallify.llm.blocks import Captured, run_block, weight_view


def output_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum ||X d^T||^2 over the calibration tokens, from H = X^T X: trace(d H d^T)."""
    return ((d @ h) * d).sum()


def search_scale(weights: list[torch.Tensor], h: torch.Tensor, x_mean: torch.Tensor,
                 quantize: Callable[[torch.Tensor], torch.Tensor], steps: int = 20) -> tuple[torch.Tensor, float, float]:
    """(s, alpha, error) minimising the group's output error sum_l ||X (Q(W_l diag(s)) diag(1/s) - W_l)^T||^2
    over s = x_mean^alpha (normalised to geometric mean ~1), alpha on ``steps`` points in [0, 1]; alpha = 0 is
    s = 1, so the result is never worse than no scaling on the calibration data."""
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    x_mean = x_mean.clamp_min(1e-6)
    for alpha in torch.linspace(0, 1, steps).tolist():
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float(output_error(quantize(w * s) / s - w, h)) for w in weights)
        if err < best[2]:
            best = (s, alpha, err)
    return best


def hessian_blocks(h: torch.Tensor, group: int | None) -> torch.Tensor:
    """The diagonal (g, g) blocks of H, one per group of input columns: (G, g, g)."""
    n = h.shape[0]
    g = n if group is None else group
    k = n // g
    return h.reshape(k, g, k, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _candidates(block: nn.Module, width: int, members: set[str]) -> list[tuple[str, nn.Module]]:
    found = []
    for name, m in block.named_modules():
        if name in members or any(True for _ in m.children()):
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if w.ndim == 1 and w.numel() == width or w.ndim == 2 and weight_view(m).shape[0] == width:
            found.append((name, m))
    return found


def scale_outputs(m: nn.Module, r: torch.Tensor) -> None:
    """Multiply the output channels of a norm or Linear ``m`` by ``r`` (weight and bias)."""
    with torch.no_grad():
        if m.weight.ndim == 1:
            m.weight.mul_(r)
        else:
            weight_view(m).mul_(r[:, None])
        bias = getattr(m, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.mul_(r)


def scale_inputs(m: nn.Module, r: torch.Tensor) -> None:
    with torch.no_grad():
        weight_view(m).mul_(r[None, :])


def find_producer(block: nn.Module, members: list[str], batch: Captured) -> str | None:
    """The name (inside ``block``) of the op whose output channels can carry the group's scales, or None."""
    modules = dict(block.named_modules())
    first = modules[members[0]]
    width = weight_view(first).shape[1]
    seen = {}
    handle = first.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    try:
        reference_out = run_block(block, batch)
        x0 = seen["x"]
        gen = torch.Generator().manual_seed(0)
        r = 0.5 + torch.rand(width, generator=gen)
        for name, m in _candidates(block, width, set(members)):
            saved = {k: v.detach().clone() for k, v in m.state_dict().items()}
            member_saved = {n: weight_view(modules[n]).detach().clone() for n in members}
            try:
                scale_outputs(m, r)
                run_block(block, batch)
                if not torch.allclose(seen["x"], x0 * r, rtol=1e-3, atol=1e-5 * float(x0.abs().max())):
                    continue
                for n in members:
                    scale_inputs(modules[n], 1 / r)
                out = run_block(block, batch)
                tol = 1e-3 * float(reference_out.abs().max())
                if torch.allclose(out, reference_out, rtol=1e-3, atol=tol):
                    return name
            finally:
                m.load_state_dict(saved)
                with torch.no_grad():
                    for n in members:
                        weight_view(modules[n]).copy_(member_saved[n])
    finally:
        handle.remove()
    return None


def fold(block: nn.Module, producer: str, members: list[str], s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the members' input columns by ``s``."""
    modules = dict(block.named_modules())
    scale_outputs(modules[producer], 1 / s)
    for n in members:
        scale_inputs(modules[n], s)
