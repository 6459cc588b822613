"""Finding a causal LM's decoder blocks and their Linear layers without an architecture list, capturing what
the first block receives, and running one block on captured inputs.

The blocks are the ``nn.ModuleList`` whose children all share one class and that holds the most parameters
(``model.layers`` of Llama/Qwen2/Mistral, ``transformer.h`` of GPT-2, ...). A block is called exactly as the
model calls it: the positional and keyword arguments seen by a pre-hook on the first block (attention mask,
position embeddings, ...) are kept per calibration batch, and only the hidden states change from block to
block."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from smallify.errors import ModelError
from smallify.quant import modules as qmod


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the decoder blocks; ModelError when the model has no such list."""
    best, best_params = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            params = sum(p.numel() for p in m.parameters())
            if params > best_params and any(linear_layers(c) for c in m[:1]):
                best, best_params = (name, m), params
    if best is None:
        raise ModelError(f"{type(model).__name__} has no list of decoder blocks holding Linear layers; accepted: "
                         "a causal LM whose blocks sit in one nn.ModuleList (Llama, Qwen2, Mistral, GPT-2, ...)")
    return best


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The Linear-like layers of ``block`` (anything with a Linear twin: nn.Linear, transformers' Conv1D), by
    their name inside the block, in definition order."""
    found = {}
    for name, m in block.named_modules():
        twin = qmod.lookup(m)
        if twin is not None and twin.kind == "linear":
            found[name] = m
    return found


def weight_view(m: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), a view that in-place edits reach (Conv1D stores it transposed)."""
    return m.weight.t() if type(m).__name__ == "Conv1D" else m.weight


class _Stop(Exception):
    pass


@dataclass
class Captured:
    """One calibration batch at the blocks: the hidden states and the other arguments the model passes."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def capture(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int) -> list[Captured]:
    """Run the model on ``windows`` (N, T) token ids up to the first block, batch by batch."""
    seen: list[Captured] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append(Captured(hidden.detach(), tuple(args[1:]), dict(kwargs)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                try:
                    model(input_ids=windows[i:i + batch_size], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(seen) != (windows.shape[0] + batch_size - 1) // batch_size:
        raise ModelError("the model did not call its first decoder block once per batch; smallify calibrates "
                         "causal LMs whose forward runs the blocks in order")
    return seen


def run_block(block: nn.Module, batch: Captured, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The block's output hidden states for one captured batch (``hidden`` replaces the captured input)."""
    with torch.no_grad():
        out = block(batch.hidden if hidden is None else hidden, *batch.args, **batch.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
