"""Loading a causal LM for weight-only quantization, offline and without pickles: a transformers model object, a
local Hugging Face folder (config.json + safetensors), or a .gguf file (read by transformers' GGUF loader, which
dequantizes its tensors to ``dtype``). Which architectures load is transformers' own table
(AutoModelForCausalLM), not a list kept here.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from smallify.errors import ConfigError, ModelError, first_line

ACCEPTED = ("a transformers causal LM object, a Hugging Face folder (config.json + *.safetensors) or a .gguf file; "
            "architectures: those transformers' AutoModelForCausalLM loads (Llama, Qwen2, Mistral, Phi-3, GPT-2, ...)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Where a model came from: ``kind`` 'hf_model' (an object), 'hf_folder' or 'gguf'; ``path`` the folder or
    the .gguf file (None for an object); ``gguf_file`` the GGUF file's name inside its folder."""

    kind: str
    path: Path | None = None
    gguf_file: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": None if self.path is None else str(self.path), "gguf_file": self.gguf_file}


def is_llm_source(path) -> bool:
    """True for what ``load_causal_lm`` reads from disk: a folder holding config.json, or a .gguf file."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix.lower() == ".gguf")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _check_loaded(model, info: dict, where) -> None:
    """Weights the checkpoint lacks would be left at their random init: refuse rather than quantize noise."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{where}: the checkpoint lacks {len(missing)} of {type(model).__name__}'s weights "
                         f"(first: {missing[0]}); they would be random — the weights do not match config.json")


def _is_causal(config, mapping) -> bool:
    """transformers has a causal-LM class for this config, and the checkpoint was saved from one (config.json's
    ``architectures``): a BERT encoder's config maps to BertLMHeadModel, but its folder holds no LM head."""
    if type(config) not in mapping:
        return False
    classes = mapping[type(config)]
    names = {c.__name__ for c in (classes if isinstance(classes, (tuple, list)) else (classes,))}
    archs = getattr(config, "architectures", None) or []
    return not archs or any(a in names or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _tokenizer(folder: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - the model stands without it: token ids can still be given
        warnings.warn(f"{folder}: no tokenizer loaded ({first_line(e)}); give calibration data as token ids",
                      stacklevel=3)
        return None


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; accepted: {ACCEPTED}")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ModelError(f"{folder} holds only pickled weights ({pickles[0]}), which smallify never loads (a "
                             "pickle can run code); convert them to safetensors first (save_pretrained(..., "
                             "safe_serialization=True) in a trusted environment)")
        raise ModelError(f"{folder} has no *.safetensors weights; accepted: {ACCEPTED}")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure of the library is quoted in one line
        raise ModelError(f"{folder}/config.json cannot be read by transformers ({first_line(e)}); "
                         f"accepted: {ACCEPTED}") from None
    if not _is_causal(config, MODEL_FOR_CAUSAL_LM_MAPPING):
        arch = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise ModelError(f"{folder} is a {config.model_type} model ({arch}), not a causal language model; "
                         f"accepted: {ACCEPTED}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                           use_safetensors=True, trust_remote_code=False,
                                                           output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any failure of the library is quoted in one line
        raise ModelError(f"{folder}: transformers cannot load it ({first_line(e)}); accepted: {ACCEPTED}") from None
    _check_loaded(model, info, folder)
    tokenizer = _tokenizer(folder) if any((folder / f).is_file() for f in TOKENIZER_FILES) else None
    return model.eval(), tokenizer, SourceInfo("hf_folder", folder)


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (starts {magic!r}, not b'GGUF'); accepted: {ACCEPTED}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                           local_files_only=True, trust_remote_code=False,
                                                           output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - unsupported architecture / tensor type, a cut file: quoted
        raise ModelError(f"{path}: transformers cannot read this GGUF ({first_line(e)}); accepted: GGUF files of "
                         "the architectures and tensor types transformers' GGUF loader reads") from None
    _check_loaded(model, info, path)
    tokenizer = _tokenizer(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer, SourceInfo("gguf", path, path.name)


def load_causal_lm(source, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer or None, SourceInfo) for ``source``: a transformers PreTrainedModel
    (returned as is, tokenizer None), a local Hugging Face folder or a .gguf file. Never goes online, never
    unpickles."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype!r} is not supported; accepted: a floating torch dtype (torch.float32, "
                          "torch.bfloat16, torch.float16)")
    if isinstance(source, torch.nn.Module):
        from transformers import PreTrainedModel

        if not isinstance(source, PreTrainedModel):
            raise ModelError(f"a {type(source).__name__} is not a transformers model; accepted: {ACCEPTED}")
        return source, None, SourceInfo("hf_model")
    if not isinstance(source, (str, os.PathLike)):
        raise ModelError(f"a {type(source).__name__} is not a model source; accepted: {ACCEPTED}")
    path = Path(source)
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder; accepted: {ACCEPTED}")
    _offline()
    if path.is_dir():
        return _load_folder(path, dtype)
    if path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype)
    raise ModelError(f"{path} is neither a folder nor a .gguf file; accepted: {ACCEPTED}")
