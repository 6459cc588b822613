"""Export to the formats runtimes load: ONNX (QDQ for quantized models)."""
