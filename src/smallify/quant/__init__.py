"""Quantization: pure numerics (primitives, observers), module twins, PTQ for PyTorch and ONNX."""
