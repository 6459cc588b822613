"""Bringing a float ONNX model as users have it into the form every pass expects: initializers are weights,
the opset is converted up (onnx's version converter), constants and BatchNorm are folded, shapes inferred."""
from __future__ import annotations

import os
import tempfile

import onnx
from onnx import helper

from smallify.errors import ModelError, first_line
from smallify.onnx.graph import constants, drop_unused_initializers
from smallify.onnx.io import LARGE_MODEL_BYTES, copy_model


def weights_not_inputs(model: onnx.ModelProto) -> int:
    """Models written before IR version 4 (the model-zoo classics) list every initializer as a graph input too.
    Those are weights, not inputs to calibrate or feed, and a runtime treats an initializer that is also an
    input as overridable (it will not fold it): drop them from the inputs, with an IR version that allows
    that. Returns how many were dropped."""
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(keep)
    model.ir_version = max(model.ir_version, 4)
    return dropped


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model at default-domain opset ``version`` or above, converted operator by operator with onnx's
    version converter (never by rewriting the number), with the IR version that opset needs."""
    current = opset_of(model)
    if current >= version:
        model.ir_version = max(model.ir_version, _min_ir(current))
        return model
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as e:
        first = first_line(e)
        raise ModelError(f"cannot convert the model from opset {current} to opset {version}, which the quantized "
                         f"graph needs ({first[:200]}); re-export it at opset {version} or newer") from None
    converted.ir_version = max(converted.ir_version, _min_ir(version))
    return converted


def _min_ir(opset: int) -> int:
    """The lowest IR version that carries default-domain ``opset`` (int4 needs 10 at opset 21, FP8 9 at 19)."""
    try:
        return helper.find_min_ir_version_for([helper.make_opsetid("", opset)], True)
    except Exception:  # noqa: BLE001 - an opset newer than this onnx knows: leave the model's own IR version
        return 3


def normalize(model: onnx.ModelProto, opset: int = 13) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers are weights (not graph inputs) at opset ``opset`` or above."""
    model = copy_model(model)
    weights_not_inputs(model)
    return upgrade_opset(model, opset)


def preprocess(model: onnx.ModelProto, opset: int = 13) -> onnx.ModelProto:
    """Bring a float model as users have it into the form every pass expects: initializers are weights (not
    graph inputs), the opset is at least ``opset`` (converted), constant subgraphs are folded and BatchNorm
    is folded (ONNX Runtime's basic graph optimizations), shapes are inferred."""
    import onnxruntime as ort

    model = normalize(model, opset)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "opt.onnx")
        large = model.ByteSize() > LARGE_MODEL_BYTES
        onnx.save(model, src, save_as_external_data=large, location="in.onnx.data")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        if large:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load the model: {first_line(e, 300)}") from None
        out = onnx.load(dst)
    if not large:
        out = onnx.shape_inference.infer_shapes(out)
    return out


def _rank(model: onnx.ModelProto, tensor: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def reduce_mean_to_global_average_pool(model: onnx.ModelProto) -> int:
    """Rewrite ReduceMean over the spatial axes of a 4-D tensor (keepdims) as GlobalAveragePool, which ONNX
    Runtime runs on uint8 (QLinearGlobalAveragePool, channels-last) where ReduceMean would run in float.
    PyTorch exports ``AdaptiveAvgPool2d(1)`` as that ReduceMean. Returns the count."""
    consts = constants(model)
    count = 0
    for n in model.graph.node:
        if n.op_type != "ReduceMean" or _rank(model, n.input[0]) != 4:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axes = attrs.get("axes")
        if axes is None and len(n.input) > 1 and n.input[1] in consts:
            axes = consts[n.input[1]].tolist()
        if attrs.get("keepdims", 1) != 1 or axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        n.op_type = "GlobalAveragePool"
        del n.input[1:]
        del n.attribute[:]
        count += 1
    if count:
        drop_unused_initializers(model)
    return count
