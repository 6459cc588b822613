"""Sizes on disk."""
from __future__ import annotations

import os
from pathlib import Path


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file (plus its ONNX external-data file, if any, named ``<file>.data``), or of
    every file in a model folder (a Hugging Face checkpoint)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"
