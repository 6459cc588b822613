"""Real English sentences available offline: the first sentences of Python standard-library docstrings.

Deterministic for a given Python version; used to calibrate and evaluate sentence-embedding models.
"""
from __future__ import annotations

import importlib
import inspect
import re

MODULES = ("os", "re", "json", "collections", "itertools", "functools", "math", "statistics", "string",
           "textwrap", "pathlib", "shutil", "subprocess", "threading", "asyncio", "random", "datetime",
           "calendar", "heapq", "bisect", "csv", "email.message", "http.client", "urllib.parse", "logging",
           "argparse", "unittest", "inspect", "typing", "decimal", "fractions", "tarfile", "zipfile", "socket",
           "sqlite3", "difflib", "pickle", "queue", "tempfile", "glob", "fnmatch", "contextlib", "dataclasses")


def sentences(n: int | None = None, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Up to ``n`` distinct sentences, in a fixed order."""
    out, seen = [], set()
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for _, obj in sorted(inspect.getmembers(module), key=lambda kv: kv[0]):
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if not doc:
                continue
            text = " ".join(doc.split("\n\n")[0].split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                words = s.split()
                if min_words <= len(words) <= max_words and s[0].isupper() and s not in seen and ">>>" not in s:
                    seen.add(s)
                    out.append(s)
    return out if n is None else out[:n]


def more_sentences(exclude: set[str] | list[str] = (), min_words: int = 5, max_words: int = 48) -> list[str]:
    """Every sentence of every docstring paragraph of the same modules, their classes and their methods, minus
    ``exclude`` (e.g. an evaluation set): training text for distilling sentence-embedding models."""
    skip, out, seen = set(exclude), [], set()
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objs = []
        for _, obj in sorted(inspect.getmembers(module), key=lambda kv: kv[0]):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                objs.append(obj)
                if inspect.isclass(obj):
                    objs += [m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                for s in re.split(r"(?<=[.!?])\s+", text):
                    words = s.split()
                    if min_words <= len(words) <= max_words and s[:1].isupper() and s not in seen \
                            and s not in skip and ">>>" not in s:
                        seen.add(s)
                        out.append(s)
    return out
