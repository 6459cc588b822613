"""Text for LLMs: reading it (.txt, .jsonl), tokenizing it into one stream of ids, and cutting the stream into
non-overlapping windows of ``seq_len`` tokens, spread evenly over the whole text (calibration covers all of it,
deterministically: the same text gives the same windows).

``default_texts()`` is real English available offline: the docstrings of a fixed list of CPython stdlib modules
(never ``pydoc_data.topics``, which is the evaluation text of ``smallify.measure.perplexity.eval_text``).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch

from smallify.errors import DataError

PLAIN_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)

# Modules whose docstrings make the default calibration text (about 100k tokens of English prose and API docs).
DEFAULT_MODULES = ("argparse", "collections", "json", "email.message", "email.utils", "http.client", "http.server",
                   "http.cookies", "urllib.parse", "urllib.request", "logging", "textwrap", "difflib", "inspect",
                   "typing", "dataclasses", "functools", "pathlib", "subprocess", "threading", "unittest.case",
                   "datetime", "decimal", "fractions", "statistics", "random", "string", "shutil", "tarfile",
                   "zipfile", "csv", "configparser", "calendar", "doctest", "pickletools", "tokenize", "ftplib",
                   "smtplib", "imaplib", "mailbox", "optparse", "pdb", "heapq", "bisect", "enum", "abc", "ast")


def read_text(path) -> str:
    """The whole of a UTF-8 text file; DataError (one line) when it is missing, a folder, not UTF-8 or empty."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; accepted: a UTF-8 text file (.txt) or a .jsonl file with a \"text\" field")
    if not p.is_file():
        raise DataError(f"{p} is not a file; accepted: a UTF-8 text file (.txt) or a .jsonl file with a \"text\" field")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        "accepted: a UTF-8 text file — convert it, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise DataError(f"{p} is empty; calibration and evaluation need text")
    return text


def read_jsonl(path) -> list[str]:
    """The ``"text"`` field of every line of a .jsonl file (blank lines skipped); DataError naming the bad line."""
    p = Path(path)
    texts = []
    for number, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {number} is not JSON ({e.msg} at column {e.colno}); "
                            "accepted: one JSON object per line with a \"text\" string") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            got = f"keys {sorted(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{p} line {number} has no \"text\" string (got {got}); "
                            "accepted: one JSON object per line with a \"text\" string")
        texts.append(obj["text"])
    if not any(t.strip() for t in texts):
        raise DataError(f"{p} holds no text; accepted: one JSON object per line with a \"text\" string")
    return texts


def read_texts(path) -> list[str]:
    """A file of text by its suffix: .txt/.text/.md (one text) or .jsonl (one text per line)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(p)
    if suffix in PLAIN_SUFFIXES:
        return [read_text(p)]
    raise DataError(f"{p}: text files ending {suffix or '(no suffix)'!r} are not read; accepted: "
                    f"{', '.join(PLAIN_SUFFIXES + JSONL_SUFFIXES)} (plain UTF-8 text, or one JSON object per line "
                    "with a \"text\" field)")


def default_texts() -> list[str]:
    """Docstrings of ``DEFAULT_MODULES`` (each module's, then its own classes', functions' and methods', in
    name order), cleaned and de-duplicated: the same list on every run of the same Python."""
    texts, seen = [], set()

    def add(doc):
        doc = inspect.cleandoc(doc) if isinstance(doc, str) else ""
        if len(doc) >= 40 and doc not in seen:        # one-liners add little but noise
            seen.add(doc)
            texts.append(doc)

    for name in DEFAULT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:                           # a Python built without a module (e.g. no _ssl): skip it
            continue
        add(module.__doc__)
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            if getattr(obj, "__module__", None) != module.__name__ or attr.startswith("_"):
                continue
            if inspect.isclass(obj):
                add(obj.__doc__)
                for member in sorted(vars(obj)):
                    if not member.startswith("_"):
                        add(getattr(vars(obj)[member], "__doc__", None) if callable(vars(obj)[member]) else None)
            elif inspect.isfunction(obj):
                add(obj.__doc__)
    if not texts:
        raise DataError("this Python has no docstrings (run with -OO?); pass calibration text explicitly")
    return texts


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' "sequence longer than the model's maximum" warning: the stream is cut into windows
    afterwards, and one long encode is the point."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """One stream of ids (int64, 1-D) for ``text``, without special tokens (windows are cut anywhere)."""
    if tokenizer is None:
        raise DataError("text needs a tokenizer to become token ids; pass tokenizer=, or pass token ids "
                        "(a LongTensor) instead of text")
    with _quiet_transformers():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def as_ids(data) -> torch.Tensor:
    """Token ids given as a tensor or array (1-D stream or [rows, tokens]) -> int64 tensor, checked."""
    t = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data.detach().cpu()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"token ids must be integers, got dtype {t.dtype}; accepted: a LongTensor/int array of ids")
    if t.ndim not in (1, 2):
        raise DataError(f"token ids of shape {tuple(t.shape)}; accepted: [tokens] or [rows, tokens]")
    t = t.long()
    if t.numel() and int(t.min()) < 0:
        raise DataError(f"token ids hold a negative id ({int(t.min())}); accepted: ids >= 0")
    return t


def all_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Every non-overlapping window of ``seq_len`` tokens, in order: [W, seq_len]. A 1-D stream is one row; each
    row of a 2-D tensor is cut on its own (its tail shorter than a window is dropped)."""
    rows = ids.reshape(1, -1) if ids.ndim == 1 else ids
    per_row = rows.shape[1] // seq_len
    return rows[:, :per_row * seq_len].reshape(-1, seq_len)


def _stream(data, tokenizer) -> torch.Tensor:
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return as_ids(data)
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        try:
            exists = p.exists()
        except (OSError, ValueError):                  # a long text given as a string: not a file name
            exists = False
        if not exists and isinstance(data, str):
            raise DataError(f"{data[:60]!r} is not an existing file; a string is read as a path to .txt/.jsonl — "
                            "to calibrate on a string of text, pass it in a list: [text]")
        texts = read_texts(p)
    elif isinstance(data, (list, tuple)):
        if not data or not all(isinstance(t, str) for t in data):
            bad = next((type(t).__name__ for t in data if not isinstance(t, str)), "nothing")
            raise DataError(f"a list of texts must hold strings, got {bad}; accepted: a list of str")
        texts = list(data)
    else:
        raise DataError(f"calibration data of type {type(data).__name__} is not supported; accepted: a list of "
                        "strings, a path to a .txt/.jsonl file, or token ids [rows, tokens] (LongTensor/ndarray)")
    return tokenize("\n\n".join(texts), tokenizer)


def _check_vocab(ids: torch.Tensor, tokenizer) -> None:
    if tokenizer is not None and ids.numel() and int(ids.max()) >= len(tokenizer):
        raise DataError(f"token id {int(ids.max())} is outside the tokenizer's vocabulary of {len(tokenizer)}; "
                        "the ids were made with another tokenizer")


def calibration_windows(data, tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seq_len`` token ids, evenly spaced over the data: [samples, seq_len].

    ``data``: a list/tuple of strings (joined with blank lines, then tokenized), a path to a .txt or .jsonl file,
    or token ids (LongTensor/ndarray, [tokens] or [rows, tokens]; rows cut into windows, not tokenized again)."""
    for name, value in (("samples", samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name}={value!r} is not supported; accepted: an integer >= 1")
    ids = _stream(data, tokenizer)
    _check_vocab(ids, tokenizer)
    if ids.ndim == 2:                                  # rows: pick whole windows, evenly over all of them
        windows = all_windows(ids, seq_len)
        if len(windows) < samples:
            raise DataError(f"{samples} windows of {seq_len} tokens are needed but the token ids {tuple(ids.shape)} "
                            f"hold {len(windows)} (rows of {ids.shape[1]} tokens); give more rows, fewer samples "
                            "or a shorter seq_len")
        pick = torch.tensor([i * len(windows) // samples for i in range(samples)])
        return windows[pick].clone()
    n, need = ids.numel(), samples * seq_len
    if n < need:
        raise DataError(f"calibration needs {need} tokens ({samples} samples x seq_len {seq_len}) but the text has "
                        f"{n}; give more text, fewer samples or a shorter seq_len")
    # starts i * (n - seq_len) / (samples - 1): first window at the start, last at the end, gaps >= seq_len
    starts = [0] if samples == 1 else [i * (n - seq_len) // (samples - 1) for i in range(samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])
