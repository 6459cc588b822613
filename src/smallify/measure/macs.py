"""Multiply-accumulate operations and parameter counts of a PyTorch model, per sample, by forward hooks."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def count_macs(model: nn.Module, example_inputs) -> int:
    """MACs of one forward pass over ``example_inputs``, divided by its batch size (Conv, Linear, attention
    matmuls are not counted; they are the same before and after channel pruning of a CNN)."""
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else {}     # a tokenizer's output
    inputs = () if kwargs else (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    total = [0]

    def hook(m, args, out):
        per_out = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.weight.shape[-1] if isinstance(m, nn.Linear) \
            else m.weight.shape[0]                  # transformers' Conv1D: a Linear stored [in, out]
        total[0] += out.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               or _transposed_linear(m)]
    try:
        with torch.no_grad():
            model.eval()(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total[0] // next(t for t in (*inputs, *kwargs.values()) if isinstance(t, torch.Tensor)).shape[0]


def _transposed_linear(m: nn.Module) -> bool:
    return any(f"{k.__module__}.{k.__qualname__}" == "transformers.pytorch_utils.Conv1D" for k in type(m).__mro__)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
