"""After channel pruning a Hugging Face model: the sizes its config gives, brought in line with its layers.

HF builds layers from ``config`` (``intermediate_size``; GPT-2's ``n_inner``, where None means 4 x
``n_embd``), and some modules keep a copy (``LlamaMLP.intermediate_size``). When every layer's FFN was
pruned to the same width, the config says that width, so ``save_pretrained`` / ``from_pretrained`` and a
factory built from the config agree with the pruned model; when the widths differ (``scope='global'``) the
config keeps its value and the returned note says so (``smallify.load`` with a factory model still fits the
saved shapes).
"""
from __future__ import annotations

from torch import nn

FFN_SIZES = ("intermediate_size", "n_inner")


def _ffn_size(config, attr: str) -> int | None:
    value = getattr(config, attr, None)
    if attr == "n_inner" and value is None and isinstance(getattr(config, "n_embd", None), int):
        return 4 * config.n_embd
    return value if isinstance(value, int) else None


def sync_config(model: nn.Module, groups: list[dict]) -> list[str]:
    """Set the FFN width in ``model.config`` (and modules' ``intermediate_size``) from the pruned ``groups``
    (the report's entries: ``before``, ``after``); notes on what could not be set."""
    config = getattr(model, "config", None)
    notes = []
    for attr in FFN_SIZES:
        width = _ffn_size(config, attr) if config is not None else None
        if width is None:
            continue
        after = {g["after"] for g in groups if g["before"] == width and g.get("after") is not None}
        if after == {width} or not after:
            continue
        if len(after) > 1:
            notes.append(f"config.{attr} stays {width}: the FFN widths differ per layer ({sorted(after)}); load the "
                         "saved model with smallify.load(path, factory_model), which fits each layer's shape")
            continue
        new = after.pop()
        setattr(config, attr, new)
        for m in model.modules():
            if getattr(m, "intermediate_size", None) == width and m is not config:
                m.intermediate_size = new
        notes.append(f"config.{attr}: {width} -> {new}")
    return notes
