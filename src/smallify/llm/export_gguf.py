"""A weight-only quantized LLM as a GGUF file for llama.cpp, holding smallify's grid exactly.

llama.cpp's block formats store one (d, m) pair per 32 consecutive input channels of a row:
    Q4_0: value = d * (u - 8),  u in 0..15    (smallify's signed 4-bit grid, zero point 0)
    Q4_1: value = d * u + m,    u in 0..15    (unsigned 4-bit grid: d = scale, m = -scale * zero_point)
    Q8_0: value = d * v,        v in -128..127 (signed 8-bit grid, zero point 0)
A group of ``g`` input channels, ``g`` a multiple of 32 (per output channel: ``g`` = the row), is written by
repeating its (d, m) in each of its blocks, with the twin's own integers: GPTQ/AWQ grids are kept, nothing is
re-rounded. The only change is fp16 storage of d and m (relative rounding <= 2^-11 each, so a value moves by at
most 2^-11 * (|d * u| + |m|): at most 1.5% of a grid step). A signed 4-bit grid whose zero points are not all 0
is exact in Q4_1. 2/3/5/6/7 bits, asymmetric 8 bits and groups not a multiple of 32 have no exact llama.cpp
type and are refused.

GGUF holds the tokenizer and the hyper-parameters, so the writer needs the GGUF the model came from as its
template: its metadata is copied, its tensor names and shapes are the checklist. A Hugging Face folder is first
converted with llama.cpp's convert_hf_to_gguf.py. Llama's q/k rows are stored in llama.cpp's rotary order (the
permutation transformers undoes when it loads a GGUF); groups lie along input columns, so rows permute with
their grids.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smallify.errors import ConfigError, ModelError, OutputError, first_line
from smallify.files import write_atomic
from smallify.quant.modules import QuantTwin
from smallify.quant.primitives import IntFormat

BLOCK = 32
ACCEPTED = ("4-bit (Q4_0 sym / Q4_1 asym) or 8-bit sym (Q8_0) with group_size a multiple of 32 "
            "(or per output channel)")
# GGUF architecture -> how its q/k rows are ordered: "rotary" (llama.cpp's permutation) or None (as in HF).
# Both round-trip through transformers' GGUF loader (tested); other architectures are refused until tested.
ROW_ORDER = {"llama": "rotary", "qwen2": None}
FLOAT_TYPES = ("F16", "F32")
PASS_THROUGH = ("rope_freqs.weight",)
SET_BY_WRITER = ("general.architecture", "general.alignment", "general.file_type", "general.quantization_version")      # template tensors that are constants, not model parameters


# ---------------------------------------------------------------------------------------------- pure math

def rotary_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's q/k permutation: GGUF row i holds HF row ``index[i]`` (convert_hf_to_gguf's
    ``permute``: each head's two rotary halves interleaved)."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def block_params(param: torch.Tensor, rows: int, cols: int, group: int | None) -> np.ndarray:
    """A per-group (or per-row, or per-tensor) grid parameter repeated to one value per 32-column block:
    shape [rows, cols // 32]. Requires ``group`` to be a multiple of 32 (checked by the caller)."""
    p = param.detach().cpu().to(torch.float64).numpy()
    nb = cols // BLOCK
    if group is None:
        return np.broadcast_to(p.reshape(-1, 1) if p.ndim else p, (rows, nb)).copy()
    return p[:, (np.arange(nb) * BLOCK) // group]


def _halves(u: np.ndarray) -> np.ndarray:
    """4-bit values [rows, nb, 32] -> ggml's nibbles [rows, nb, 16]: byte j = u[j] | u[j + 16] << 4."""
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def _fp16(x: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(x).all() or np.abs(x).max(initial=0) > 65504:
        raise ModelError(f"a {what} of {np.abs(x).max():.4g} does not fit GGUF's fp16 block storage (max 65504)")
    return x.astype(np.float16)[..., None].view(np.uint8)


def pack_q4_0(u: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0 bytes of integers ``u`` [rows, cols] in 0..15 (value d*(u-8)), ``d`` [rows, cols//32]."""
    rows, cols = u.shape
    u = u.reshape(rows, cols // BLOCK, BLOCK).astype(np.uint8)
    return np.concatenate([_fp16(d, "scale"), _halves(u)], axis=-1).reshape(rows, -1)


def pack_q4_1(u: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_1 bytes of integers ``u`` [rows, cols] in 0..15 (value d*u + m)."""
    rows, cols = u.shape
    u = u.reshape(rows, cols // BLOCK, BLOCK).astype(np.uint8)
    return np.concatenate([_fp16(d, "scale"), _fp16(m, "minimum"), _halves(u)], axis=-1).reshape(rows, -1)


def pack_q8_0(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0 bytes of integers ``v`` [rows, cols] in -128..127 (value d*v)."""
    rows, cols = v.shape
    v = v.reshape(rows, cols // BLOCK, BLOCK).astype(np.int8).view(np.uint8)
    return np.concatenate([_fp16(d, "scale"), v], axis=-1).reshape(rows, -1)


def block_type(twin: QuantTwin, name: str) -> str:
    """The GGML type that holds ``twin``'s grid exactly ('Q4_0', 'Q4_1', 'Q8_0'), or a ConfigError naming what
    GGUF accepts. A signed 4-bit grid with zero points other than 0 is exact in Q4_1 too."""
    fmt, group = twin.spec.fmt, twin.spec.group_size
    if twin._modules.get("input_quant") is not None:
        raise ConfigError(f"{name} also quantizes its input (a static INT8 twin); GGUF holds weight-only grids: "
                          f"accepted: {ACCEPTED}")
    if not isinstance(fmt, IntFormat) or fmt.bits not in (4, 8):
        what = f"{fmt.bits}-bit" if isinstance(fmt, IntFormat) else twin.spec.describe()
        raise ConfigError(f"{name}: {what} weights have no exact GGUF block type; accepted: {ACCEPTED}")
    cols = twin.weight.shape[1]
    if (group or cols) % BLOCK:
        raise ConfigError(f"{name}: group_size={group or cols} ({'groups' if group else 'per channel'}) has "
                          f"no exact GGUF block type; accepted: {ACCEPTED}")
    zero_at_half = bool((twin.weight_zero_point + (0 if fmt.signed else -2 ** (fmt.bits - 1)) == 0).all())
    if fmt.bits == 8 and not zero_at_half:
        raise ConfigError(f"{name}: asymmetric 8-bit weights (zero points other than 0) have no exact GGUF "
                          f"block type; accepted: {ACCEPTED}")
    return "Q8_0" if fmt.bits == 8 else "Q4_0" if zero_at_half else "Q4_1"


def twin_blocks(twin: QuantTwin, name: str, rows: np.ndarray | None = None) -> tuple[str, np.ndarray]:
    """(GGML type, bytes [out, in // 32 * block bytes]) of a twin's stored grid; ``rows``: a row order."""
    qtype = block_type(twin, name)
    fmt, group = twin.spec.fmt, twin.spec.group_size
    q, scale, zero = twin.stored()
    out, cols = q.shape
    offset = 2 ** (fmt.bits - 1) if fmt.signed else 0     # the grid as unsigned integers u = q + offset
    u = q.to(torch.int64).cpu().numpy() + offset
    d = block_params(scale, out, cols, group)
    zu = block_params(zero, out, cols, group) + offset
    if rows is not None:
        u, d, zu = u[rows], d[rows], zu[rows]
    if qtype == "Q8_0":
        return qtype, pack_q8_0(u - 128, d)
    if qtype == "Q4_0":
        return qtype, pack_q4_0(u, d)
    return qtype, pack_q4_1(u, d, -d * zu)


# ---------------------------------------------------------------------------------------------- the file

@functools.lru_cache(maxsize=2)
def _open_template(path: Path, mtime_ns: int, size: int):
    """A parsed template (GGUFReader takes seconds on a 49k-token vocabulary); cached by path, time and size."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read template {path} as GGUF: {first_line(e)}") from None


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    return field.contents() if field is not None else default


def _model_tensors(model: nn.Module, name_map, arch: str) -> dict[str, tuple[str, nn.Module, str]]:
    """GGUF name -> (HF name, owning module, parameter name) for every parameter of ``model``."""
    found, unmapped = {}, []
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, _ in module.named_parameters(recurse=False):
            hf = f"{mname}.{pname}" if mname else pname
            gname = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
            if gname is None:
                unmapped.append(hf)
            else:
                found.setdefault(gname, (hf, module, pname))
    if unmapped:
        raise ModelError(f"{len(unmapped)} parameters have no GGUF name for architecture {arch!r} "
                         f"(e.g. {unmapped[0]}); the model and the template GGUF must be the same architecture")
    return found


def _check_template(reader, model: nn.Module, template: Path) -> tuple[str, int, int, int]:
    """(architecture, blocks, heads, KV heads) of the template, checked against the model's config."""
    arch = _field(reader, "general.architecture")
    if arch not in ROW_ORDER:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported; accepted: {', '.join(ROW_ORDER)}")
    n_blocks = int(_field(reader, f"{arch}.block_count"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    cfg = getattr(model, "config", None)
    for key, value in (("num_hidden_layers", n_blocks), ("num_attention_heads", n_head),
                       ("num_key_value_heads", n_head_kv)):
        if getattr(cfg, key, value) != value:
            raise ModelError(f"model {key}={getattr(cfg, key)} but template {template.name} has {value}; "
                             "give the GGUF this model was loaded from")
    return arch, n_blocks, n_head, n_head_kv


def _tensor_names(found: dict, shapes: dict, template: Path) -> list[str]:
    """The template's tensors, plus output.weight for an lm_head untied from the embedding (e.g. a twin);
    every one must come from the model (or be a constant such as rope_freqs), and every model tensor go in."""
    names = list(shapes)
    head, embd = found.get("output.weight"), found.get("token_embd.weight")
    if "output.weight" not in shapes and head is not None and embd is not None and \
            getattr(head[1], head[2]) is not getattr(embd[1], embd[2]):
        names.append("output.weight")
    missing = [n for n in names if n not in found and n not in PASS_THROUGH]
    extra = [found[n][0] for n in found if n not in names and n != "output.weight"]
    if missing or extra:
        raise ModelError(f"model and template {template.name} disagree: "
                         + (f"template tensor {missing[0]} has no model parameter" if missing
                            else f"model parameter {extra[0]} has no tensor in the template"))
    return names


def save_gguf(model: nn.Module, out: str | os.PathLike, template: str | os.PathLike | None = None, *,
              float_type: str = "F16", force: bool = False, embedding_type: str | None = None) -> Path:
    """Write ``model`` (a transformers causal LM whose Linears are smallify twins) as a GGUF file at ``out``.

    ``template``: the GGUF the model came from (required: GGUF output needs it for the tokenizer and the
    hyper-parameters; convert a Hugging Face folder with llama.cpp's convert_hf_to_gguf.py first). Every
    metadata key is copied from it (general.file_type set to the type most of the weights take), and every one
    of its tensors is written, under its name and shape, from the model: twins as Q4_0 / Q4_1 / Q8_0 packed
    from their stored integers, other matrices as ``float_type`` ('F16' or 'F32'; a quantized token_embd of
    the template is written float, as the model holds it), vectors (norms, biases) as F32. An lm_head not tied
    to the embedding is added as output.weight. ``embedding_type``: 'Q8_0' stores a float token_embd as llama.cpp's
    Q8_0 (as llama.cpp's own quantizer does; with a tied head llama.cpp then runs the head in Q8_0, faster than
    F16, no longer equal to the float head), 'template' the template's type when it is Q8_0. ``force``:
    overwrite an existing ``out``. Architectures:
    llama (q/k rows in llama.cpp's rotary order) and qwen2."""
    import gguf

    if template is None:
        raise ConfigError("GGUF output needs the source GGUF as template= for its tokenizer and metadata; "
                          "convert a Hugging Face folder with llama.cpp's convert_hf_to_gguf.py first")
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"float_type={float_type!r} is not supported; accepted: {', '.join(FLOAT_TYPES)}")
    template, out = Path(template), Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass force=True to overwrite it, or give another name")
    for name, m in model.named_modules():               # refuse a grid before any long work
        if isinstance(m, QuantTwin) and m.spec.fmt is not None:
            block_type(m, f"{name}.weight")
    if not template.is_file():
        raise ModelError(f"template {template} is not a file; give the GGUF the model was loaded from")
    stat = template.stat()
    reader = _open_template(template.resolve(), stat.st_mtime_ns, stat.st_size)
    arch, n_blocks, n_head, n_head_kv = _check_template(reader, model, template)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    found = _model_tensors(model, gguf.get_tensor_name_map(arch_id, n_blocks), arch)
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape.tolist())) for t in reader.tensors}

    tensors, counts = [], {}
    for name in _tensor_names(found, shapes, template):
        if name not in found:                           # a constant of the template (rope_freqs): as it is
            t = next(t for t in reader.tensors if t.name == name)
            tensors.append((name, np.array(t.data), t.tensor_type))
            continue
        hf, module, pname = found[name]
        rows = None
        if ROW_ORDER[arch] == "rotary" and (".attn_q." in name or ".attn_k." in name):
            rows = rotary_rows(getattr(module, pname).shape[0], n_head if ".attn_q." in name else n_head_kv)
        if isinstance(module, QuantTwin) and pname == "weight" and module.spec.fmt is not None:
            qtype, data = twin_blocks(module, hf, rows)
            shape = tuple(module.weight.shape)
            counts[qtype] = counts.get(qtype, 0) + module.weight.numel()
        elif name == "token_embd.weight" and _embedding_q8(embedding_type, reader):
            w = getattr(module, pname).detach().float().cpu().numpy()
            qtype, shape = "Q8_0", w.shape
            data = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
        else:
            w = getattr(module, pname).detach().float().cpu().numpy()
            w = w[rows] if rows is not None else w
            qtype = float_type if w.ndim > 1 else "F32"
            data, shape = w.astype(np.float16 if qtype == "F16" else np.float32), w.shape
        if name in shapes and shapes[name] != shape:
            raise ModelError(f"{hf} has shape {list(shape)} but template tensor {name} has {list(shapes[name])}")
        tensors.append((name, data, gguf.GGMLQuantizationType[qtype] if isinstance(qtype, str) else qtype))
    major = max(counts, key=counts.get) if counts else ("MOSTLY_F16" if float_type == "F16" else "ALL_F32")
    file_type = gguf.LlamaFileType[major if major.startswith(("MOSTLY", "ALL")) else f"MOSTLY_{major}"]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in SET_BY_WRITER:
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
        if reader.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            writer.add_custom_alignment(reader.alignment)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic(out, write, inputs=(template,))


def _embedding_q8(embedding_type: str | None, reader) -> bool:
    if embedding_type not in (None, "Q8_0", "template"):
        raise ConfigError(f"embedding_type={embedding_type!r} is not supported; accepted: None (float_type), 'Q8_0', "
                          "'template'")
    if embedding_type == "template":
        import gguf

        kinds = {t.name: t.tensor_type for t in reader.tensors}
        return kinds.get("token_embd.weight") == gguf.GGMLQuantizationType.Q8_0
    return embedding_type == "Q8_0"


def read_gguf_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to float32, by GGUF name, in numpy layout ([rows, columns]:
    the reverse of GGUF's ne order; llama's q/k rows in llama.cpp's rotary order)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        tuple(int(s) for s in reversed(t.shape.tolist()))) for t in reader.tensors}
