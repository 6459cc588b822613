"""``Goal``: what ``compress`` searches for: the user's metric and the drop it may lose, the objective
(latency on a runtime, or file size), where and how latency is measured, and how long the search may take."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from smallify.config import Config, check_choice
from smallify.errors import ConfigError

OBJECTIVES = ("latency", "size")
RUNTIMES = ("onnxruntime", "openvino")
FAMILIES = ("quantize", "prune", "decompose", "cluster")


@dataclasses.dataclass
class Goal(Config):
    """``metric``: ``metric(onnx_path) -> float``, the task metric measured on a candidate's ONNX file (the
    file that is deployed), higher is better unless ``higher_is_better=False``. ``max_drop``: how much of the
    metric a candidate may lose against the float model, in the metric's own units (0.5 for half a point of
    top-1 in percent). ``objective``: 'latency' (the geometric mean over ``batch`` of the latency ratio to the
    float model on ``runtime`` with ``threads`` threads, each model timed in its own process) or 'size' (bytes of
    the smallest file written: the ONNX file or the .smallify container). ``budget_minutes``: the search stops
    starting new work after this (None: no limit). ``workers``: candidates built and scored in that many worker
    processes (timing always runs alone). ``families``: the technique families tried. ``finetune``: at most this
    many structural candidates (pruned, decomposed) are fine-tuned by distillation from the float model, the
    most promising first, when ``compress`` is given ``train_data``; ``epochs`` each, with ``distill_loss`` ('kl' on
    class logits, 'mse' or 'cosine' for embeddings and other outputs)."""

    kind = "goal"
    verbs = ("compress",)
    max_drop: float = 0.5
    metric: Callable | None = None
    metric_name: str = "metric"
    higher_is_better: bool = True
    objective: str = "latency"
    runtime: str = "onnxruntime"
    batch: tuple[int, ...] = (1, 32)
    threads: int = 2
    budget_minutes: float | None = None
    workers: int = 1
    families: tuple[str, ...] = FAMILIES
    finetune: int = 4
    epochs: float = 1.0
    lr: float = 1e-3
    distill_loss: str = "kl"
    timing_seconds: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("runtime", self.runtime, RUNTIMES)
        check_choice("distill_loss", self.distill_loss, ("kl", "mse", "cosine"))
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or not self.max_drop >= 0:
            raise ConfigError(f"max_drop={self.max_drop!r} is not supported; accepted: a number >= 0 in the metric's "
                              "units (e.g. 0.5 for half a point of top-1 in percent)")
        if self.metric is not None and not callable(self.metric):
            raise ConfigError(f"metric={self.metric!r} is not callable; accepted: a function metric(onnx_path) -> float")
        self.batch = (self.batch,) if isinstance(self.batch, int) else tuple(self.batch)
        if not self.batch or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch):
            raise ConfigError(f"batch={self.batch!r} is not supported; accepted: a batch size >= 1 or a tuple of them")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ConfigError(f"budget_minutes={self.budget_minutes!r} must be > 0 (or None: no limit)")
        for name in ("threads", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        if isinstance(self.finetune, bool) or not isinstance(self.finetune, int) or self.finetune < 0:
            raise ConfigError(f"finetune={self.finetune!r} must be an integer >= 0")
        self.families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"families={bad or self.families!r} is not supported; accepted: {', '.join(FAMILIES)}")
        if not self.epochs > 0 or not self.lr > 0 or not self.timing_seconds > 0:
            raise ConfigError(f"epochs, lr and timing_seconds must be > 0; got {self.epochs!r}, {self.lr!r}, "
                              f"{self.timing_seconds!r}")
        if self.metric is not None and self.metric_name == "metric":
            self.metric_name = getattr(self.metric, "__name__", "metric")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("metric")
        return d

    def drop(self, base: float, value: float) -> float:
        """How much worse ``value`` is than ``base`` (positive: worse), in the metric's units."""
        return (base - value) if self.higher_is_better else (value - base)
