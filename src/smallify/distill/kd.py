"""Knowledge distillation (Hinton et al. 2015): the student matches the teacher's softened class
probabilities, KL(softmax(t/T) || softmax(s/T)) * T^2, weighted ``alpha`` against the cross-entropy on the
labels (when there are labels); optionally it also matches intermediate features (mean squared error after a
learned 1x1 projection when the widths differ, as in FitNets). Training goes through ``smallify.train``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smallify.config import Config, check_config
from smallify.errors import ConfigError, ModelError
from smallify.train import TrainConfig, TrainData, train


@dataclasses.dataclass
class KD(Config):
    """``temperature`` T > 0; ``alpha`` in [0, 1]: weight of the soft-label loss (1 - alpha on the labels);
    ``features``: {student layer: teacher layer} pairs matched by MSE, weighted ``feature_weight``;
    ``output_loss``: 'kl' on softened logits (classifiers), 'mse' or 'cosine' (1 - cos) on the outputs
    themselves (embedding models)."""

    kind = "kd"
    verbs = ("distill",)
    temperature: float = 4.0
    alpha: float = 0.9
    features: dict = dataclasses.field(default_factory=dict)
    feature_weight: float = 1.0
    output_loss: str = "kl"

    def __post_init__(self):
        if self.output_loss not in ("kl", "mse", "cosine"):
            raise ConfigError(f"output_loss={self.output_loss!r} is not supported; accepted: 'kl' (class logits), "
                              "'mse', 'cosine' (embeddings, regression outputs)")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature!r} must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha={self.alpha!r} must lie in [0, 1]")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softened distributions, scaled by T^2 (gradients keep their size across T)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t


class _Features:
    """Forward hooks that keep the outputs of named layers."""

    def __init__(self, model: nn.Module, names):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ModelError(f"no layer named {missing} in {type(model).__name__}")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: self.out.__setitem__(n, o))
                        for n in names]

    def close(self):
        for h in self.handles:
            h.remove()


def _check_shapes(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        s, t = student.eval()(x[:2]), teacher.eval()(x[:2])
    if s.shape != t.shape:
        raise ModelError(f"student and teacher outputs differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}; "
                         "distillation needs the same output (e.g. the same classes)")


def distill(student: nn.Module, teacher: nn.Module, data: TrainData, config: KD | None = None,
            train_config: TrainConfig | None = None, eval_fn: Callable | None = None,
            checkpoint: str | os.PathLike | None = None, progress: bool = True) -> nn.Module:
    """Train ``student`` (in place) to mimic ``teacher`` on ``data``; returns the student with ``train_history``."""
    config = check_config(config, KD, "distill") or KD()
    check_config(train_config, TrainConfig, "distill", "train_config")
    if not isinstance(data, TrainData):
        from smallify.errors import DataError

        raise DataError(f"training data of type {type(data).__name__} is not supported; accepted: smallify.TrainData")
    _check_shapes(student, teacher, data.x[:2])
    teacher = teacher.eval()     # its outputs are computed under no_grad; its parameters are left as they are
    s_feats = _Features(student, list(config.features)) if config.features else None
    t_feats = _Features(teacher, list(config.features.values())) if config.features else None
    adapters = nn.ModuleDict()
    extra_params = []
    if config.features:
        with torch.no_grad():
            student(data.x[:2]), teacher(data.x[:2])
        for s_name, t_name in config.features.items():
            cs, ct = s_feats.out[s_name].shape[1], t_feats.out[t_name].shape[1]
            if s_feats.out[s_name].shape[2:] != t_feats.out[t_name].shape[2:]:
                raise ModelError(f"features {s_name} {tuple(s_feats.out[s_name].shape)} and {t_name} "
                                 f"{tuple(t_feats.out[t_name].shape)} differ beyond the channel axis")
            if cs != ct:
                conv = s_feats.out[s_name].ndim == 4
                adapters[s_name.replace(".", "_")] = nn.Conv2d(cs, ct, 1, bias=False) if conv else nn.Linear(cs, ct, bias=False)
        extra_params = list(adapters.parameters())

    def loss_fn(out, target, x):
        with torch.no_grad():
            t_out = teacher(x)
        if config.output_loss == "kl":
            soft = kd_loss(out, t_out, config.temperature)
        elif config.output_loss == "mse":
            soft = F.mse_loss(out, t_out)
        else:
            soft = (1 - F.cosine_similarity(out.flatten(1), t_out.flatten(1))).mean()
        loss = config.alpha * soft
        if target is not None and config.alpha < 1:
            loss = loss + (1 - config.alpha) * F.cross_entropy(out, target)
        for s_name, t_name in config.features.items():
            f = s_feats.out[s_name]
            key = s_name.replace(".", "_")
            if key in adapters:
                f = adapters[key](f)
            loss = loss + config.feature_weight * F.mse_loss(f, t_feats.out[t_name])
        return loss

    try:
        params = [p for p in student.parameters() if p.requires_grad] + extra_params
        result = train(student, data, train_config, loss_fn, eval_fn, checkpoint, progress, params=params)
    finally:
        for h in (s_feats, t_feats):
            if h is not None:
                h.close()
    student.train_history, student.report = result.history, result
    return student.eval()
