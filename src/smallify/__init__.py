"""smallify: make trained neural networks small and fast, and prove it with measured numbers."""
from smallify import llm
from smallify.api import QuantizedONNX, quantize
from smallify.cluster import Binary, HashShare, KMeans, PowerOfTwo, Ternary, cluster, snap_codebooks
from smallify.errors import ConfigError, DataError, ModelError, OutputError, SmallifyError
from smallify.export.onnx import export_onnx
from smallify.lowrank import LowRank, decompose
from smallify.distill import KD, distill
from smallify.pack import load, save
from smallify.prune import AttentionPrune, prune_attention
from smallify.prune import ChannelPrune, Unstructured, finalize, prune, prune_gradually, sparsify, sparsity_of
from smallify.quant.config import Float16, FP8Static, Int8Static, WeightOnly
from smallify.quant.dynamic import Int8Dynamic
from smallify.quant.mixed import MixedPrecision
from smallify.quant.qat import qat
from smallify.train import TrainConfig, TrainData, train
from smallify.tune import Goal, compress

__version__ = "0.1.0"
__all__ = ["llm", "compress", "Goal", "quantize", "cluster", "snap_codebooks", "KMeans", "Binary", "Ternary", "PowerOfTwo", "HashShare", "decompose", "LowRank", "qat", "prune", "prune_attention", "AttentionPrune", "ChannelPrune", "Unstructured", "sparsify", "prune_gradually", "finalize",
           "sparsity_of", "distill", "KD", "train", "TrainConfig", "TrainData", "export_onnx", "save", "load", "Int8Static", "FP8Static", "WeightOnly", "Float16", "MixedPrecision", "Int8Dynamic", "QuantizedONNX", "SmallifyError", "ConfigError",
           "DataError", "ModelError", "OutputError", "__version__"]
