"""``smallify quantize MODEL_DIR_OR_GGUF --method gptq ...``: the LLM branch of the quantize command.

Every check that can fail runs before the long work (output folder, method, grid against the format), the
quantization keeps a checkpoint folder beside the output (``OUT.partial``) so that running the same command
again after a kill resumes after the last finished block, and the output is written atomically."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from smallify.errors import ConfigError, OutputError

LLM_METHODS = ("gptq", "awq", "awq+gptq", "datafree", "hqq", "rtn")
FORMATS = ("hf", "gguf", "smallify")


def make_config(method: str, bits: int | None, group_size, sym: bool, lm_head: bool, samples: int | None,
                seq_len: int | None, skip: tuple[str, ...]):
    """The config of an LLM method named on the command line ('int8', the command's default, means gptq:
    the best setting measured in benchmarks/llm_weight_only.py)."""
    from smallify.llm.config import GPTQ, METHODS

    method = "gptq" if method == "int8" else method
    if method not in LLM_METHODS:
        raise ConfigError(f"--method {method!r} does not apply to a language model; accepted: {', '.join(LLM_METHODS)}")
    fields = {"bits": 4 if bits is None else bits, "group_size": 64 if group_size == "auto" else group_size,
              "sym": sym, "lm_head": lm_head, "skip": skip}
    if method in ("gptq", "awq", "awq+gptq"):
        fields.update({k: v for k, v in (("samples", samples), ("seq_len", seq_len)) if v is not None})
    if method == "awq+gptq":
        return GPTQ(awq=True, **fields)
    return METHODS[method](**fields)


def _holds(out: Path, source: Path) -> bool:
    """Whether replacing ``out`` would overwrite or delete ``source`` (the same path, or a folder holding it)."""
    out, source = out.resolve(), source.resolve()
    return out == source or out in source.parents


def check_output(out: Path, fmt: str, force: bool, source: Path | None = None) -> None:
    """Refuse, before any work, an output that cannot be written or would replace the input; an existing one
    unless ``force``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; accepted: {', '.join(FORMATS)}")
    if source is not None and _holds(out, source):
        raise OutputError(f"--out {out} is the input {source} or a folder holding it; smallify never overwrites "
                          "its input: give another --out")
    if fmt == "hf":
        if out.exists() and not out.is_dir():
            raise OutputError(f"--out {out} is a file; --format hf writes a folder: give a new or empty folder")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise OutputError(f"{out} exists and is not an empty folder; pass --force to replace it, or give "
                              "another --out")
    elif out.is_dir():
        raise OutputError(f"--out {out} is a folder; --format {fmt} writes one file: give a file name such as "
                          f"{out / ('model.' + fmt)}")
    elif out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to overwrite it, or give another --out")
    from smallify.files import probe_folder

    probe_folder(out, out.parent if str(out.parent) else Path("."))


def check_gguf_grid(config) -> None:
    """Refuse, before any work, a grid that no llama.cpp block type holds exactly (``export_gguf.block_type``
    checks each layer again when writing)."""
    from smallify.llm.export_gguf import ACCEPTED

    group = config.group_size
    if config.bits not in (4, 8) or (config.bits == 8 and not config.sym) or group is None or group % 32:
        raise ConfigError(f"--bits {config.bits} --group-size {group} {'--sym' if config.sym else '--asym'} has no "
                          f"exact GGUF block type; accepted: {ACCEPTED} (or --format hf / smallify)")


@contextlib.contextmanager
def _loading_bars(progress: bool):
    """transformers' 'Loading weights' bar only where progress is shown (a refusal is then one line on stderr)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def quantize_llm_command(source: Path, out: Path, config, calib: Path | None, fmt: str, force: bool,
                         progress: bool) -> str:
    """Load, quantize (resumable), write; returns the lines to print."""
    import smallify as sm
    from smallify.llm.load import load_causal_lm

    check_output(out, fmt, force, source)
    if fmt == "gguf":
        if source.suffix.lower() != ".gguf":
            raise ConfigError("--format gguf needs a .gguf input (its tokenizer and metadata are copied); convert a "
                              "Hugging Face folder with llama.cpp's convert_hf_to_gguf.py first, or use --format hf")
        check_gguf_grid(config)
    if config.uses_data and calib is None:
        raise ConfigError(f"--method {config.method} calibrates on text: give --calib text.txt (or .jsonl with a "
                          "'text' field); --method datafree needs none")
    data = None
    if calib is not None and config.uses_data:
        from smallify.llm.text import read_texts

        data = read_texts(calib)
    with _loading_bars(progress):
        model, tokenizer, _ = load_causal_lm(source)
    partial = out.with_name(out.name + ".partial")
    model = sm.quantize(model, config, data=data, tokenizer=tokenizer, progress=progress,
                        checkpoint=partial if config.uses_data else None)
    if fmt == "hf":
        from smallify.llm.export_hf import save_hf

        save_hf(model, out, tokenizer=tokenizer, force=force)
    elif fmt == "gguf":
        from smallify.llm.export_gguf import save_gguf

        save_gguf(model, out, template=source, force=force, embedding_type="template")
    else:
        sm.save(model, out)
    shutil.rmtree(partial, ignore_errors=True)
    return str(model.quant_report)
