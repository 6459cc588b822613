"""What quantization did to each layer, for people and for JSON."""
from __future__ import annotations

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

    @property
    def quantized(self) -> list[str]:
        return [l.name for l in self.layers if l.status == "quantized"]

    @property
    def floating(self) -> dict[str, str]:
        return {l.name: l.reason for l in self.layers if l.status != "quantized"}

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        smooth = f" + SmoothQuant alpha {self.smooth_quant:g}" if self.smooth_quant is not None else ""
        lines = [f"scheme: {self.scheme}{smooth}; {len(self.quantized)} layer(s) quantized, {len(self.floating)} left in float; "
                 f"{self.activations} activation tensor(s) quantized; calibrated on {self.calibration_samples} "
                 f"sample(s) in {self.calibration_seconds:.1f} s"]
        lines += [f"  float: {name} ({reason})" for name, reason in self.floating.items()]
        return "\n".join(lines)
