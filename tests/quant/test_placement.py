from smallify.quant.placement import GNode, place


def residual_block():
    # x -> conv1 -> relu1 -> conv2 -> add(+x) -> relu2 -> maxpool -> flatten -> fc -> out
    return [
        GNode("conv1", "conv", ["x"], ["c1"]),
        GNode("relu1", "relu", ["c1"], ["r1"]),
        GNode("conv2", "conv", ["r1"], ["c2"]),
        GNode("add", "add", ["c2", "x"], ["a"]),
        GNode("relu2", "relu", ["a"], ["r2"]),
        GNode("pool", "maxpool", ["r2"], ["p"]),
        GNode("flat", "flatten", ["p"], ["f"]),
        GNode("fc", "linear", ["f"], ["out"]),
    ]


def test_residual_block_placement():
    p = place(residual_block(), {"out"})
    assert p.calibrated == ["x", "r1", "c2", "r2"]        # ReLUs absorbed: quantize after them
    assert p.shared == {"p": "r2", "f": "r2"}             # max-pool and flatten reuse r2's parameters
    assert p.absorbed_relus == ["relu1", "relu2"]
    assert p.quantized_nodes == ["conv1", "conv2", "add", "fc"]
    assert "out" not in p.tensors()                       # graph outputs stay float


def test_skipped_layer_stays_float():
    nodes = residual_block()
    nodes[0].quantize = False                             # conv1 skipped
    p = place(nodes, {"out"})
    assert "conv1" not in p.quantized_nodes
    assert "c1" not in p.tensors() and "x" in p.tensors()  # x still feeds the quantized add
