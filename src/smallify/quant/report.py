"""What quantization did to each layer, for people and for JSON."""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str
    op: str
    status: str         # 'quantized' or 'float'
    reason: str = ""


@dataclass
class QuantReport:
    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    activations: int = 0          # activation tensors quantized
    calibration_samples: int = 0
    calibration_seconds: float = 0.0
    scheme: str = "cnn"           # the placement used ('cnn' or 'transformer'), chosen from the graph when 'auto'
    smooth_quant: float | None = None   # SmoothQuant alpha applied, if any
    plan: object = None                 # MixedPrecision: the searched per-layer plan (quant.mixed.Plan)
    round_trips: dict = field(default_factory=dict)   # ONNX: op type -> count of float ops between Q/DQ pairs

    @property
    def quantized(self) -> list[str]:
        return [l.name for l in self.layers if l.status == "quantized"]

    @property
    def floating(self) -> dict[str, str]:
        return {l.name: l.reason for l in self.layers if l.status != "quantized"}

    @property
    def warnings(self) -> list[str]:
        """What the user asked for that did nothing: ``skip`` patterns that match no layer."""
        skip = self.config.get("skip") or ()
        names = [l.name for l in self.layers]
        unmatched = [p for p in skip if not any(l.reason == f"skipped by pattern {p!r}"
                                                or fnmatch.fnmatchcase(l.name, p) for l in self.layers)]
        return [f"skip pattern {p!r} matches no layer; the layers are named like "
                + ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "") for p in unmatched]

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": self.warnings}

    def __str__(self) -> str:
        smooth = f" + SmoothQuant alpha {self.smooth_quant:g}" if self.smooth_quant is not None else ""
        lines = [f"scheme: {self.scheme}{smooth}; {len(self.quantized)} layer(s) quantized, {len(self.floating)} left in float; "
                 f"{self.activations} activation tensor(s) quantized; "
                 + (f"calibrated on {self.calibration_samples} sample(s) in {self.calibration_seconds:.1f} s"
                    if self.calibration_samples else "no calibration (data-free)")]
        if self.config.get("reduce_range") is True and 8 in (self.config.get("weight_bits", 8),
                                                             *self.config.get("layer_bits", {}).values()):
            lines.append("  8-bit weights on a 7-bit grid (reduce_range: integer kernels without VNNI/AMX "
                         "saturate on full-range int8)")
        lines += [f"  float: {name} ({reason})" for name, reason in self.floating.items()]
        if self.round_trips:
            lines.append("  no integer kernel, run in float between DequantizeLinear and QuantizeLinear (a round trip "
                         "each; time the model against FP32 with --check-speed): "
                         + ", ".join(f"{op} x{n}" for op, n in sorted(self.round_trips.items())))
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.plan is not None:
            lines.append(str(self.plan))
        return "\n".join(lines)
