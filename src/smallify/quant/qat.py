"""Quantization-aware training: fine-tune a quantized model through its fake quantizers.

``qat(sm.quantize(model, config, calib), TrainData(...))``: post-training quantization gives the starting
scales; every weight and activation scale then becomes a parameter learned with the LSQ gradient (Esser et
al., "Learned Step Size Quantization", 2020) while the weights train through the straight-through
estimator. At the end the scales are frozen back into buffers: the result is the same kind of model as
PTQ's, exported by ``export_onnx`` and saved by ``save`` the same way.
"""
from __future__ import annotations

import os
from typing import Callable

from torch import nn

from smallify.config import check_config
from smallify.errors import ModelError
from smallify.quant import modules as qmod
from smallify.train import TrainConfig, TrainData, train


def _quantizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (qmod.ActQuant, qmod.QuantTwin))]


def freeze_scales(model: nn.Module) -> None:
    """Learned scales back into buffers (positive), so that the model exports and saves like a PTQ model."""
    for m in _quantizers(model):
        name = "scale" if isinstance(m, qmod.ActQuant) else "weight_scale"
        value = getattr(m, name)
        if isinstance(value, nn.Parameter):
            delattr(m, name)
            m.register_buffer(name, value.detach().clamp_min(1e-12).clone())


def qat(qmodel: nn.Module, data: TrainData, config: TrainConfig | None = None, loss_fn: Callable | None = None,
        eval_fn: Callable[[nn.Module], float] | None = None, checkpoint: str | os.PathLike | None = None,
        progress: bool = True, learn_scales: bool = True) -> nn.Module:
    """Fine-tune ``qmodel`` (from ``smallify.quantize``) in place with its quantizers active; returns it with
    ``train_history`` set. ``config`` defaults to one epoch of AdamW at lr 1e-4 (cosine)."""
    quantizers = _quantizers(qmodel)
    if not quantizers or not hasattr(qmodel, "quant_config"):
        raise ModelError("qat needs a model returned by smallify.quantize (it starts from PTQ's scales); got a "
                         f"{type(qmodel).__name__} without quantizers")
    if any(getattr(m, "calibrating", False) for m in quantizers):
        raise ModelError("the model's activation quantizers were never calibrated")
    if learn_scales:
        for m in quantizers:
            m.make_scale_learnable()
    for p in qmodel.parameters():
        p.requires_grad_(True)
    config = check_config(config, TrainConfig, "qat") or TrainConfig(epochs=1, lr=1e-4, optimizer="adamw")
    try:
        result = train(qmodel, data, config, loss_fn, eval_fn, checkpoint, progress)
    finally:
        freeze_scales(qmodel)
    qmodel.train_history = result.history
    return qmodel.eval()


