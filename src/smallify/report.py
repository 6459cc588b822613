"""The one report protocol: whatever the verb, its result carries ``.report``, an object with ``to_dict()``
(JSON-ready) and ``__str__`` (lines for people).

    quantize (PyTorch and ONNX), mixed precision  -> quant.report.QuantReport (with the searched plan)
    prune                                         -> prune.channel.PruneReport
    prune_attention                               -> prune.transformer.AttentionPruneReport
    train, distill, prune_gradually               -> train.TrainResult

The older attribute names (``quant_report``, ``prune_report``, ``mixed_plan``, ``train_history``) stay as
aliases of the same objects (or of a part of them).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Report(Protocol):
    def to_dict(self) -> dict: ...

    def __str__(self) -> str: ...


def attach(result, report, *aliases: str):
    """Set ``result.report`` and the verb's older attribute names to ``report``; returns ``result``."""
    result.report = report
    for name in aliases:
        setattr(result, name, report)
    return result
