"""After channel pruning a Hugging Face model: the sizes its config gives, brought in line with its layers.

HF builds layers from ``config`` (``intermediate_size``; GPT-2's ``n_inner``, where None means 4 x
``n_embd``; ``num_attention_heads`` / ``num_key_value_heads``), and some modules keep a copy
(``LlamaMLP.intermediate_size``, ``BertSelfAttention.num_attention_heads`` and ``all_head_size``).
Attention heads: the config follows only where it states ``head_dim`` (Llama); BERT derives the head size
from ``hidden_size / num_attention_heads``, so its config cannot say fewer heads and keeps its value. When every layer's FFN was
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
    return notes + _sync_heads(model, config)


def _sync_heads(model: nn.Module, config) -> list[str]:
    heads, kv_heads = set(), set()
    for m in model.modules():
        if isinstance(getattr(m, "query", None), nn.Linear) and isinstance(getattr(m, "attention_head_size", None), int):
            m.all_head_size = m.query.out_features                                  # BERT
            m.num_attention_heads = m.all_head_size // m.attention_head_size
            heads.add(m.num_attention_heads)
        elif all(isinstance(getattr(m, k, None), nn.Linear) for k in ("q_proj", "k_proj")) \
                and isinstance(getattr(m, "head_dim", None), int):                  # Llama and its kin
            heads.add(m.q_proj.out_features // m.head_dim)
            kv_heads.add(m.k_proj.out_features // m.head_dim)
            for attr, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, next(iter(value)))
    notes = []
    for attr, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        before = getattr(config, attr, None)
        if not value or value == {before} or not isinstance(before, int):
            continue
        if len(value) > 1 or not isinstance(getattr(config, "head_dim", None), int):
            why = "the head counts differ per layer" if len(value) > 1 else \
                "the config derives the head size from it"
            notes.append(f"config.{attr} stays {before}: {why}; load the saved model with "
                         "smallify.load(path, factory_model), which fits each layer's shape")
            continue
        setattr(config, attr, value.pop())
        notes.append(f"config.{attr}: {before} -> {getattr(config, attr)}")
    return notes
