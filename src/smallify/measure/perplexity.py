"""Perplexity of a causal LM on a text: non-overlapping windows of ``seq_len`` tokens, each predicted from its own
start (no context carried across windows), ppl = exp(mean NLL of the seq_len - 1 predicted tokens per window).

The benchmark's evaluation text is ``eval_text()``: CPython's ``pydoc_data.topics`` (the language reference's
help topics), offline and the same on every machine with the same Python.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from smallify.errors import ConfigError, DataError
from smallify.progress import track


@dataclasses.dataclass
class PerplexityResult:
    """``ppl`` = exp(``nll``); ``nll`` the mean negative log-likelihood (nats per predicted token); ``tokens`` the
    predicted tokens (windows * (seq_len - 1))."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {self.ppl:.4f} (NLL {self.nll:.5f} nats/token over {self.tokens} predicted tokens, "
                f"{self.windows} windows of {self.seq_len})")


def eval_text() -> str:
    """All of ``pydoc_data.topics.topics``' texts, in the dict's order, joined with blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def _positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not supported; accepted: an integer >= {minimum}")


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def perplexity(model, text, tokenizer=None, seq_len: int = 512, max_tokens: int | None = None,
               progress: bool = True, batch_size: int = 1) -> PerplexityResult:
    """Perplexity of ``model`` (a causal LM returning ``.logits``) on ``text``: a string (tokenized with
    ``tokenizer``, no special tokens) or token ids (LongTensor, [tokens] or [rows, tokens]). ``max_tokens``
    caps the tokens read: windows = min(available, max_tokens) // seq_len. ``batch_size`` windows per forward:
    the logits of a batch take batch_size * seq_len * vocab floats (SmolLM2, 512 tokens: 100 MB a window); on
    a CPU one window of 512 tokens already fills the matrix products, larger batches pay off on a GPU."""
    from smallify.llm.text import all_windows, as_ids, tokenize

    _positive_int("seq_len", seq_len, 2)
    _positive_int("batch_size", batch_size, 1)
    if max_tokens is not None:
        _positive_int("max_tokens", max_tokens, seq_len)
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"seq_len={seq_len} is longer than the model's {limit} positions; accepted: seq_len <= {limit}")
    if isinstance(text, str):
        ids = tokenize(text, tokenizer)
    elif isinstance(text, torch.Tensor):
        ids = as_ids(text)
    else:
        raise DataError(f"text of type {type(text).__name__} is not supported; accepted: a string (with tokenizer=) "
                        "or a LongTensor of token ids")
    windows = all_windows(ids, seq_len)
    if len(windows) == 0:
        raise DataError(f"the text has {ids.shape[-1]} tokens, fewer than one window of seq_len={seq_len}; "
                        "give more text or a shorter seq_len")
    if max_tokens is not None:
        windows = windows[:max_tokens // seq_len]
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and int(windows.max()) >= vocab:
        raise DataError(f"token id {int(windows.max())} is outside the model's vocabulary of {vocab}; "
                        "the text was tokenized with another model's tokenizer")

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    batches = range(0, len(windows), batch_size)
    try:
        with torch.no_grad():
            for start in track(batches, f"perplexity ({len(windows)} windows of {seq_len})", enabled=progress):
                ids_b = windows[start:start + batch_size].to(device)                  # (B, T)
                logits = model(input_ids=ids_b, use_cache=False).logits               # (B, T, V)
                nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_b[:, 1:].flatten(), reduction="none")
                total += nll.double().sum().cpu()
    finally:
        model.train(was_training)
    tokens = len(windows) * (seq_len - 1)
    mean = total.item() / tokens                   # NaN/Inf stay visible: a broken model is a result, not an error
    ppl = math.nan if math.isnan(mean) else math.exp(mean) if mean < 700 else math.inf
    return PerplexityResult(ppl=ppl, nll=mean, tokens=tokens, windows=len(windows), seq_len=seq_len)
