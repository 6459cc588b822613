"""A quantized causal LM as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads: the
compressed-tensors "pack-quantized" format (the format llm-compressor writes and vLLM serves).

Each quantized Linear is stored as ``weight_packed`` (its integers, ``bits`` each, packed densely into int32 by
compressed-tensors' own ``pack_to_int32``), ``weight_scale`` (float32, [out, in / group] or [out, 1] per output
channel), ``weight_zero_point`` (asymmetric grids: packed the same way along the output axis) and
``weight_shape``. compressed-tensors' grid is signed, [-2^(b-1), 2^(b-1)-1]: smallify's unsigned asymmetric grid
[0, 2^b-1] and its zero points are shifted down by 2^(b-1), which leaves (q - zero) * scale unchanged. A signed
grid whose zero points are all 0 is written as ``symmetric`` (no zero point stored).

What loads it: transformers' CompressedTensorsHfQuantizer with compressed-tensors installed. There is no packed
CPU kernel: the layers are unpacked into float weights once, while loading (one grid for the whole model, see
``quantization_config``) or at the first forward (several symmetric grids), so the saving is on disk and in
download size. The weights are exactly the twin's: (q - zero) * scale in float32 (in the several-grid case the
scales are cast to the model's dtype on load: exact for float32 models, rounded for half-precision ones).

Limits (``ConfigError`` before anything is written): 2..8-bit integer grids, per group or per output channel;
no FP8 twins, no twins that also quantize their input. compressed-tensors packs ``nn.Linear`` only: GPT-2's
``Conv1D`` layers (``QuantGPT2Conv1D`` twins) cannot be held packed; ``float_fallback=True`` writes them as float
holding their dequantized values (same logits, no size saving). 3-, 5-, 6- and 7-bit grids use compressed-tensors'
dense cross-word packing (0.20 and later); 2-, 4- and 8-bit packing is the same in older readers.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smallify.errors import ConfigError, ModelError, OutputError, first_line
from smallify.quant.modules import QuantGPT2Conv1D, QuantLinear, QuantTwin
from smallify.quant.primitives import IntFormat

FORMAT = "pack-quantized"
BITS = range(2, 9)
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors weight scheme: ``group_size`` None means one scale per output channel."""

    bits: int
    symmetric: bool
    group_size: int | None

    def args(self) -> dict:
        if self.group_size is None:
            return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "strategy": "channel"}
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "strategy": "group",
                "group_size": self.group_size}

    def describe(self) -> str:
        gran = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.bits}-bit {gran} {'sym' if self.symmetric else 'asym'}"


@dataclass
class Packed:
    """A twin's integers moved onto compressed-tensors' signed grid, with its scale and zero point."""

    values: torch.Tensor        # int8 [out, in], signed grid
    scale: torch.Tensor         # float32 [out, groups] ([out, 1] per channel)
    zero_point: torch.Tensor    # int8, same shape as scale (all 0 when symmetric)
    scheme: Scheme


def signed_grid(twin: QuantTwin, name: str) -> Packed:
    """``twin``'s stored integers, scale and zero point on compressed-tensors' signed grid (the dequantized
    values (q - zero) * scale are unchanged: an unsigned grid and its zero points shift by 2^(b-1) together)."""
    fmt, spec = twin.spec.fmt, twin.spec
    if not isinstance(fmt, IntFormat) or fmt.bits not in BITS:
        raise ConfigError(f"layer {name} has weight grid {spec.describe()}; the Hugging Face writer "
                          f"({FORMAT}) accepts integer grids of 2..8 bits, symmetric or asymmetric")
    if spec.group_size is None and not spec.per_channel:
        raise ConfigError(f"layer {name} has one weight scale per tensor; the Hugging Face writer ({FORMAT}) "
                          "accepts per group or per output channel scales")
    q, scale, zero = twin.stored()
    q, scale, zero = q.detach().to(torch.int32), scale.detach().float(), zero.detach().to(torch.int32)
    out = q.shape[0]
    scale, zero = scale.reshape(out, -1), zero.expand(scale.shape).reshape(out, -1)
    if not fmt.signed:
        shift = 1 << (fmt.bits - 1)
        q, zero = q - shift, zero - shift
    lo, hi = -(1 << (fmt.bits - 1)), (1 << (fmt.bits - 1)) - 1
    for what, t in (("integers", q), ("zero points", zero)):
        if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
            raise ModelError(f"layer {name}: {what} span [{int(t.min())}, {int(t.max())}], outside the "
                             f"{fmt.bits}-bit grid [{lo}, {hi}]; the twin is corrupt")
    if not torch.isfinite(scale).all() or not (scale > 0).all():
        raise ModelError(f"layer {name}: weight scales must be finite and > 0")
    symmetric = bool((zero == 0).all()) and fmt.signed
    return Packed(q.to(torch.int8), scale.contiguous(), zero.to(torch.int8),
                  Scheme(fmt.bits, symmetric, spec.group_size))


def _twins(model: nn.Module, float_fallback: bool) -> tuple[dict[str, Packed], dict[str, torch.Tensor]]:
    """The quantized layers to pack (name -> Packed) and the twins written as float (name -> weight in the
    float layer's own layout). Raises ConfigError for what the format cannot hold."""
    packed, floats, conv1d = {}, {}, []
    for name, m in model.named_modules():
        if not isinstance(m, QuantTwin):
            continue
        if not isinstance(m, QuantLinear):
            raise ConfigError(f"layer {name} is a {type(m).__name__}; the Hugging Face writer ({FORMAT}) "
                              "accepts quantized Linear layers (QuantLinear, QuantGPT2Conv1D)")
        if m._modules.get("input_quant") is not None:
            raise ConfigError(f"layer {name} also quantizes its input; the Hugging Face writer ({FORMAT}) "
                              "holds weight-only quantization")
        conv = isinstance(m, QuantGPT2Conv1D)
        if m.spec.fmt is None or (conv and float_fallback):
            with torch.no_grad():
                w = m.qweight().detach()
            floats[name] = (w.t() if conv else w).contiguous().to(m.weight.dtype)
            if m.spec.fmt is not None:
                signed_grid(m, name)            # a fallback layer still has to be a valid grid
            continue
        if conv:
            conv1d.append(name)
            continue
        packed[name] = signed_grid(m, name)
    if conv1d:
        more = f" and {len(conv1d) - 3} more" if len(conv1d) > 3 else ""
        raise ConfigError(f"layers {', '.join(conv1d[:3])}{more} are GPT-2 Conv1D layers; {FORMAT} "
                          "(compressed-tensors) packs nn.Linear layers only: pass float_fallback=True to write "
                          "them as float holding their quantized values (no size saving), or keep them float")
    return packed, floats


def _pack_int32(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    return pack_to_int32(values, bits, packed_dim=packed_dim)


def packed_tensors(name: str, p: Packed) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one packed layer, under compressed-tensors' names."""
    tensors = {f"{name}.weight_packed": _pack_int32(p.values, p.scheme.bits),
               f"{name}.weight_scale": p.scale,
               f"{name}.weight_shape": torch.tensor(tuple(p.values.shape), dtype=torch.int64)}
    if not p.scheme.symmetric:
        tensors[f"{name}.weight_zero_point"] = _pack_int32(p.zero_point, p.scheme.bits, packed_dim=0)
    return tensors


def quantization_config(packed: dict[str, Packed], float_linears: list[str]) -> dict:
    """config.json's ``quantization_config``: one config group per scheme; the most common scheme targets
    every ``Linear`` (its group last), the others name their layers (an exact name wins over a class in
    compressed-tensors' matching); Linear layers kept float are ignored.

    One scheme: ``dequantize: true`` (transformers' load option) is written too, so a plain ``from_pretrained``
    unpacks each layer from the checkpoint while loading into a plain float model. That is the path that loads
    asymmetric grids (transformers 5 + compressed-tensors 0.20 build the packed modules on the meta device
    with unpacked zero points, then refuse the packed ones), and it reads one scheme for all layers. Several
    schemes load through the packed modules (unpacked at the first forward), which hold symmetric grids only."""
    from compressed_tensors.quantization import QuantizationConfig

    by_scheme: dict[Scheme, list[str]] = {}
    for name, p in packed.items():
        by_scheme.setdefault(p.scheme, []).append(name)
    order = sorted(by_scheme, key=lambda s: -len(by_scheme[s]))
    asym = [s for s in order if not s.symmetric]
    if len(order) > 1 and asym:
        raise ConfigError(f"the model mixes weight grids ({', '.join(s.describe() for s in order)}) with an "
                          f"asymmetric one; {FORMAT} loads in transformers either one grid for all quantized "
                          "layers or symmetric grids only: use one bits/group_size for all (e.g. lm_head=False) "
                          "or sym=True")
    groups = {}      # the layers named first: compressed-tensors warns of a target that a class took before it
    for i, scheme in enumerate(reversed(order)):
        targets = ["Linear"] if scheme == order[0] else by_scheme[scheme]
        groups[f"group_{i}"] = {"targets": targets, "weights": scheme.args(), "format": FORMAT}
    cfg = QuantizationConfig.model_validate({"config_groups": groups, "format": FORMAT,
                                             "quantization_status": "compressed", "ignore": float_linears})
    out = cfg.model_dump()
    if len(order) == 1:
        out["dequantize"] = True
    return out


def _state_dict(model: nn.Module, packed: dict[str, Packed], floats: dict[str, torch.Tensor]) -> dict:
    """The checkpoint: every float tensor of ``model`` as it is (tied tensors once, the first name kept),
    twins replaced by their packed tensors or their float weight."""
    twins = {name for name, m in model.named_modules() if isinstance(m, QuantTwin)}
    out, seen = {}, set()
    for key, t in model.state_dict(keep_vars=False).items():
        owner, _, leaf = key.rpartition(".")
        if owner in twins:
            if leaf == "bias":
                out[key] = t.detach()
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:                              # tied weights: transformers re-ties them on load
            continue
        seen.add(ptr)
        out[key] = t.detach()
    for name, w in floats.items():
        out[f"{name}.weight"] = w
    for name, p in packed.items():
        out.update(packed_tensors(name, p))
    return {k: v.cpu().contiguous() for k, v in out.items()}


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _config(model: nn.Module, packed: dict[str, Packed], qconfig: dict):
    cfg = copy.deepcopy(model.config)
    if qconfig is not None:
        cfg.quantization_config = qconfig
    elif hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = _float_dtype(model)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None and any(m is head for n, m in model.named_modules() if n in packed):
        # a quantized head has its own weights: the float embedding table must not be tied to it on load
        for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
    return cfg


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file; give a folder name (a new or empty folder)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"output folder {out} exists and is not empty; give a new or empty folder, "
                          "or force=True to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"cannot write {out}: folder {out.parent} does not exist")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` onto ``out`` (an old ``out`` is moved aside first and removed last)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "dir")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "dir", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_hf(model: nn.Module, out: str | os.PathLike, tokenizer=None, force: bool = False,
            float_fallback: bool = False) -> Path:
    """Write ``model`` (a transformers causal LM whose Linear layers are smallify twins) as a Hugging Face
    folder in compressed-tensors' pack-quantized format: config.json (with ``quantization_config``),
    generation_config.json, model.safetensors, and the tokenizer's files when ``tokenizer`` is given.

    Layers kept float (embeddings, norms, an unquantized head, twins without a grid) are written in the
    model's dtype; tied embeddings stay tied unless the head itself is quantized. ``out`` must be new or an
    empty folder (``force=True`` replaces it); the folder is written beside ``out`` and renamed into place."""
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ModelError(f"save_hf takes a transformers model (with a .config); got {type(model).__name__}")
    try:
        import compressed_tensors  # noqa: F401
        from safetensors.torch import save_file
    except ImportError:
        raise ModelError("writing a Hugging Face quantized folder needs compressed-tensors "
                         "(pip install 'compressed-tensors>=0.20')") from None
    out = Path(out)
    _check_out(out, force)
    packed, floats = _twins(model, float_fallback)
    if not packed and not floats:
        raise ConfigError("the model has no quantized layers (smallify twins); quantize it first "
                          "(smallify.quantize) or save it with model.save_pretrained")
    float_linears = sorted(n for n, m in model.named_modules()       # as the loaded model names them
                           if isinstance(m, nn.Linear) and not isinstance(m, QuantGPT2Conv1D) and n not in packed)
    cfg = _config(model, packed, quantization_config(packed, float_linears) if packed else None)
    tensors = _state_dict(model, packed, floats)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        cfg.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {out}: {first_line(e)}") from e
        raise
    return out
