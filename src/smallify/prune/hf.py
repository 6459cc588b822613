"""After channel pruning a Hugging Face model: the sizes its config and modules give, in line with its layers.

HF builds layers from ``config`` (``intermediate_size``; GPT-2's ``n_inner``, where None means 4 x
``n_embd``; ``num_attention_heads`` / ``num_key_value_heads``, GPT-2's ``n_head``), and some modules keep a
copy that forward reads (GPT-2's ``split_size``) or not (``LlamaMLP.intermediate_size``,
``BertSelfAttention.num_attention_heads``). ``sync_modules`` sets those from the layers (after pruning and
after ``fit_shapes``). When every layer was pruned alike, the config says the new sizes, so
``save_pretrained`` / ``from_pretrained`` and a factory built from the config agree with the pruned model.
The config keeps its value, and the returned note says why, when the widths differ per layer or when it
derives the head size from the head count (BERT, GPT-2: only Llama-style configs state ``head_dim``);
``smallify.load(path, factory_model)`` still fits every saved shape.
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


def sync_modules(model: nn.Module) -> tuple[set, set]:
    """Module attributes that mirror layer shapes, set from the layers (after pruning, or after
    ``fit_shapes`` gave a factory model the saved shapes); the head counts and key/value head counts seen."""
    heads, kv_heads = set(), set()
    for m in model.modules():
        c_attn = getattr(m, "c_attn", None)
        if c_attn is not None and isinstance(getattr(m, "split_size", None), int) \
                and isinstance(getattr(m, "head_dim", None), int) and not getattr(m, "is_cross_attention", False):
            width = c_attn.out_features if isinstance(c_attn, nn.Linear) else c_attn.weight.shape[1]   # a twin or Conv1D
            m.split_size = width // 3                                               # GPT-2: q, k, v side by side
            m.num_heads = m.split_size // m.head_dim
            heads.add(m.num_heads)
        elif isinstance(getattr(m, "query", None), nn.Linear) and isinstance(getattr(m, "attention_head_size", None), int):
            m.all_head_size = m.query.out_features                                  # BERT
            m.num_attention_heads = m.all_head_size // m.attention_head_size
            heads.add(m.num_attention_heads)
        elif all(isinstance(getattr(m, k, None), nn.Linear) for k in ("q_proj", "k_proj")) \
                and isinstance(getattr(m, "head_dim", None), int):                  # Llama and its kin
            heads.add(m.q_proj.out_features // m.head_dim)
            kv_heads.add(m.k_proj.out_features // m.head_dim)
            for attr, value in (("num_heads", m.q_proj.out_features // m.head_dim),
                                ("num_key_value_heads", m.k_proj.out_features // m.head_dim)):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, value)
    return heads, kv_heads


def _sync_heads(model: nn.Module, config) -> list[str]:
    heads, kv_heads = sync_modules(model)
    notes = []
    names = {"num_attention_heads": "n_head"} if getattr(config, "n_head", None) is not None else {}
    for attr, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        attr = names.get(attr, attr)
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
