"""smallify: make trained neural networks small and fast, and prove it with measured numbers."""
from smallify.api import QuantizedONNX, quantize
from smallify.errors import ConfigError, DataError, ModelError, OutputError, SmallifyError
from smallify.export.onnx import export_onnx
from smallify.quant.config import Int8Static

__version__ = "0.1.0"
__all__ = ["quantize", "export_onnx", "Int8Static", "QuantizedONNX", "SmallifyError", "ConfigError",
           "DataError", "ModelError", "OutputError", "__version__"]
