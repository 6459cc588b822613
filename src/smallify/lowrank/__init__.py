"""Low-rank decomposition: ``decompose(model, LowRank(...), data)`` writes Linear and Conv2d layers as smaller
plain layers (svd, spatial, tucker, separable), keeping only the layers that got faster on the target runtime."""
from smallify.lowrank.config import LowRank
from smallify.lowrank.decompose import DecomposeReport, decompose
from smallify.lowrank.modules import Decomposed

__all__ = ["LowRank", "decompose", "Decomposed", "DecomposeReport"]
