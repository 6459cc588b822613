"""The public verbs. Each routes on the kind of model it is given (PyTorch module or ONNX file)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import onnx
from torch import nn

from smallify.errors import ConfigError, ModelError
from smallify.quant.config import Int8Static
from smallify.quant.report import QuantReport


@dataclass
class QuantizedONNX:
    """What ``quantize`` returns for an ONNX model: the QDQ model, where it was written, and the report."""

    model: onnx.ModelProto
    path: str | None
    report: QuantReport


def quantize(model, config: Int8Static | None = None, data=None, out: str | os.PathLike | None = None,
             progress: bool = True):
    """Quantize ``model`` with ``config`` (default ``Int8Static()``), calibrating on ``data``.

    * ``nn.Module``: returns a quantized ``torch.fx.GraphModule`` (its ``quant_report`` lists every layer:
      quantized, or left in float and why). Export it with ``export_onnx``.
    * path to an ``.onnx`` file or an ``onnx.ModelProto``: returns ``QuantizedONNX``; writes ``out`` if given.
      ``data`` may also be the path of a .npz file (one array per model input).
    """
    config = Int8Static() if config is None else config
    if not isinstance(config, Int8Static):
        raise ConfigError(f"config of type {type(config).__name__} is not supported here; accepted: Int8Static")
    if isinstance(model, nn.Module):
        from smallify.quant.ptq import quantize_module

        if out is not None:
            raise ConfigError("out= applies to ONNX models; for a PyTorch model call export_onnx(qmodel, path, example)")
        return quantize_module(model, config, data, progress)
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        from smallify.quant.onnx import quantize_onnx

        proto, report = quantize_onnx(model, config, data, out, progress)
        return QuantizedONNX(proto, None if out is None else str(out), report)
    raise ModelError(f"cannot quantize a {type(model).__name__}; accepted: torch.nn.Module, path to .onnx, "
                     "onnx.ModelProto")
