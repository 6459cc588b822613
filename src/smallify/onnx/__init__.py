"""The ONNX path: models in as ONNX files, quantized on the graph itself.

    io          load/save (atomic; external data for models over 1 GB)
    prepare     initializers as weights, opset conversion, constant/BatchNorm folding
    graph       reading graphs: constants, weight inputs and layouts, layer names
    calibrate   running ONNX Runtime on calibration data into observers
    smooth      SmoothQuant
    weights     writing quantized weights (int8, packed int4, FP8, blocks), int32 biases, int8 embeddings
    quantize    static INT8/FP8: placement, Q/DQ insertion, compaction
    dynamic, weight_only, mixed: the other methods' ONNX forms

The numerics (ranges, scales, grids) are ``smallify.quant``'s, shared with the PyTorch path.
"""
