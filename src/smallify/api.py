"""The public verbs. Each routes on the kind of model it is given (PyTorch module or ONNX file)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import onnx
from torch import nn

from smallify.config import check_config, configs_of
from smallify.errors import ConfigError, DataError, ModelError
from smallify.llm.config import LLMWeightOnly
from smallify.quant.config import Float16, Int8Static, WeightOnly
from smallify.quant.dynamic import Int8Dynamic
from smallify.quant.mixed import MixedPrecision
from smallify.quant.report import QuantReport


@dataclass
class QuantizedONNX:
    """What ``quantize`` returns for an ONNX model: the QDQ model, where it was written, and the report."""

    model: onnx.ModelProto
    path: str | None
    report: QuantReport
    plan: object = None     # MixedPrecision: the per-layer plan (smallify.quant.mixed.Plan)


def check_finite_weights(model: nn.Module, config) -> None:
    """ModelError naming the first layer ``config`` converts whose weight holds NaN or Inf (the ONNX path's
    rule, so that both paths refuse the same model the same way)."""
    import torch

    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or bool(torch.isfinite(w).all()):
            continue
        chosen = config.selects(name) if isinstance(config, Float16) else config.skip_pattern(name) is None
        if chosen:
            raise ModelError(f"weight of layer {name!r} ({type(m).__name__}) holds NaN or Inf; only finite weights "
                             "can be converted: fix the model, or keep the layer in float with skip=")


def quantize(model, config: Int8Static | None = None, data=None, out: str | os.PathLike | None = None,
             progress: bool = True, eval_fn=None, tokenizer=None, checkpoint=None):
    """Quantize ``model`` with ``config`` (default ``Int8Static()``), calibrating on ``data``.

    ``eval_fn``: for ``MixedPrecision``, the task metric (higher is better): ``eval_fn(module)`` for PyTorch
    models, ``eval_fn(path of an .onnx file)`` for ONNX models; the chosen plan is ``result.mixed_plan``
    (PyTorch) or ``result.plan`` (ONNX).

    Configs: ``MixedPrecision`` (per-layer bits chosen by measurement), ``Int8Static`` (INT8 activations, INT8 or lower weights; calibrated), ``FP8Static`` (calibrated),
    ``Int8Dynamic`` (int8 weights, activations quantized at run time;
    no data), ``WeightOnly`` (int2..int8 weights, per group; no data) and ``Float16`` (fp16/bf16; no data).

    * ``nn.Module``: returns a quantized ``torch.fx.GraphModule`` (its ``quant_report`` lists every layer:
      quantized, or left in float and why). Export it with ``export_onnx``.
    * path to an ``.onnx`` file or an ``onnx.ModelProto``: returns ``QuantizedONNX``; writes ``out`` if given.
      ``data`` may also be the path of a .npz file (one array per model input).
    * LLM methods (``smallify.llm``: ``RTN``, ``DataFree``, ``GPTQ``, ``AWQ``) on a transformers causal LM, a
      Hugging Face folder or a .gguf file: the model quantized in place and returned; ``data`` is calibration
      text (strings, a .txt/.jsonl path, or token ids) read with ``tokenizer``; ``checkpoint``: a folder where
      each finished block is kept, so that a killed run resumes.
    """
    config = check_config(config, configs_of("quantize"), "quantize") or Int8Static()
    static = isinstance(config, Int8Static)
    if static and data is None:
        raise DataError(f"{type(config).__name__} calibrates activations on data: pass data= (an iterable of "
                        "batches, a tensor, a dict of arrays or a .npz path); WeightOnly and Float16 need none")
    if isinstance(config, LLMWeightOnly):
        return _quantize_llm(model, config, data, tokenizer, checkpoint, progress, out)
    if isinstance(model, nn.Module):
        if out is not None:
            raise ConfigError("out= applies to ONNX models; for a PyTorch model call export_onnx(qmodel, path, example)"
                              " or smallify.save(qmodel, path)")
        check_finite_weights(model, config)
        from smallify.lowrank.modules import carry_structure

        result = _call(quantizer_for(config, "pytorch"), model, config, data=data, eval_fn=eval_fn, progress=progress)
        return carry_structure(model, result)
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        from smallify.onnx import io as onnx_io

        if out is not None:
            onnx_io.check_writable(out, (model, data))   # also refuses the data file, hard links
        result = _call(quantizer_for(config, "onnx"), model, config, data=data, eval_fn=eval_fn, progress=progress,
                       out=None)
        proto, report, plan = (*result, None)[:3]
        if not report.quantized:
            raise ModelError(nothing_quantized(config, report))
        if out is not None:
            onnx_io.save_onnx(proto, out)
        return QuantizedONNX(proto, None if out is None else str(out), report, plan)
    raise ModelError(f"cannot quantize a {type(model).__name__}; accepted: torch.nn.Module, path to .onnx, "
                     "onnx.ModelProto")


def _quantize_llm(model, config, data, tokenizer, checkpoint, progress, out):
    from smallify.llm.quantize import quantize_llm

    if out is not None:
        raise ConfigError("out= applies to ONNX models; write an LLM with smallify.llm.save_hf / save_gguf or "
                          "smallify.save")
    if isinstance(model, (str, os.PathLike)):
        from smallify.llm.load import load_causal_lm

        model, loaded_tokenizer, _ = load_causal_lm(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if not isinstance(model, nn.Module):
        raise ModelError(f"cannot quantize a {type(model).__name__} with {type(config).__name__}; accepted: a "
                         "transformers causal LM, a Hugging Face folder or a .gguf file")
    check_finite_weights(model, config)
    return quantize_llm(model, config, data, tokenizer, progress=progress, checkpoint=checkpoint)


# config type -> (PyTorch converter, ONNX converter), "module:function", imported when used and looked up along
# the config's MRO (FP8Static uses Int8Static's entry). Each converter is called with the keywords it names among
# data, eval_fn, progress and out. A new quantization method registers here, or with register_quantizer.
QUANTIZERS: dict[type, tuple[str, str]] = {
    MixedPrecision: ("smallify.quant.mixed:mixed_module", "smallify.onnx.mixed:mixed_onnx"),
    Int8Static: ("smallify.quant.ptq:quantize_module", "smallify.onnx.quantize:quantize_onnx"),
    Int8Dynamic: ("smallify.quant.dynamic:dynamic_module", "smallify.onnx.dynamic:dynamic_onnx"),
    WeightOnly: ("smallify.quant.weight_only:weight_only_module", "smallify.onnx.weight_only:convert_onnx"),
    Float16: ("smallify.quant.weight_only:half_module", "smallify.onnx.weight_only:convert_onnx"),
}


def register_quantizer(config_type: type, pytorch: str, onnx_path: str) -> None:
    """Route ``quantize(model, config_type(...))`` to ``pytorch`` / ``onnx_path`` ("module:function")."""
    QUANTIZERS[config_type] = (pytorch, onnx_path)


def quantizer_for(config, path: str):
    import importlib

    entry = next((QUANTIZERS[c] for c in type(config).__mro__ if c in QUANTIZERS), None)
    if entry is None:
        raise ConfigError(f"{type(config).__name__} has no quantizer; accepted: "
                          f"{', '.join(sorted(c.__name__ for c in QUANTIZERS))} (or register one with "
                          "smallify.api.register_quantizer)")
    module, _, name = entry[0 if path == "pytorch" else 1].partition(":")
    return getattr(importlib.import_module(module), name)


def _call(fn, model, config, **options):
    import inspect

    accepted = inspect.signature(fn).parameters
    return fn(model, config, **{k: v for k, v in options.items() if k in accepted})


_HINTS = {Int8Dynamic: "dynamic INT8 handles MatMul and Gemm layers; for convolutions use --method int8",
          WeightOnly: "weight-only handles Conv, Gemm and MatMul layers with constant weights"}


def nothing_quantized(config, report: QuantReport) -> str:
    """The one-line reason when a method found no layer it could quantize."""
    floats = report.floating
    by_reason: dict[str, list[str]] = {}
    for name, reason in floats.items():
        by_reason.setdefault(reason, []).append(name)
    shown = "; ".join(f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: {reason}"
                      for reason, names in list(by_reason.items())[:3])
    more = f"; and {len(by_reason) - 3} more reason(s)" if len(by_reason) > 3 else ""
    hint = _HINTS.get(type(config), "quantizable layers: Conv, Gemm and MatMul with constant weights")
    return (f"{type(config).__name__} found no layer it can quantize in this model"
            + (f" ({shown}{more})" if floats else " (no Conv, Gemm or MatMul layer with a constant weight)")
            + f"; {hint}; nothing was written")
