"""save(model, path) / load(path, model): compressed PyTorch models on disk, really compressed.

Layout: one safetensors file. Weights on an integer grid are bit-packed (``quant/packing.py``: b bits per
weight) under ``<layer>.weight:packed``, FP8 weights are float8 tensors; symmetric grids store no zero points;
float tensors that are at least half zeros (pruned) are stored as a bit mask and their nonzero values; scales, zero points, biases and every other tensor are stored as they are. The
safetensors metadata holds the manifest: the config that made the model, each layer's grid and the residual
branches pruning removed (``prune/branches.py``; rebuilt by the same graph rewrite). ``load`` builds
the compressed structure from the manifest on a float model the caller constructs (so no code is read from
the file), then fills it: the output equals the saved model's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from smallify import onnx_io
from smallify.errors import ModelError
from smallify.prune.branches import remove_branches, removed_branches
from smallify.quant import modules as qmod
from smallify.quant.packing import pack, unpack
from smallify.quant.primitives import FloatFormat, IntFormat, dequantize

FORMAT = "smallify"
VERSION = 1
SPARSE_MIN = 0.5    # tensors with at least this fraction of zeros are stored as a bit mask + the nonzeros


def _twins(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, qmod.QuantTwin)]


def _spec_dict(spec: qmod.WeightSpec) -> dict:
    fmt = spec.fmt
    if fmt is None:
        return {"fmt": "float"}
    if isinstance(fmt, FloatFormat):
        return {"fmt": "fp8", "name": fmt.name, "per_channel": spec.per_channel}
    return {"fmt": "int", "bits": fmt.bits, "signed": fmt.signed, "symmetric": fmt.symmetric,
            "per_channel": spec.per_channel, "group_size": spec.group_size}


def _spec_from(d: dict) -> qmod.WeightSpec:
    if d["fmt"] == "float":
        return qmod.WeightSpec(None)
    if d["fmt"] == "fp8":
        return qmod.WeightSpec(FloatFormat(d["name"]), d["per_channel"])
    return qmod.WeightSpec(IntFormat(d["bits"], d["signed"], d["symmetric"]), d["per_channel"], d["group_size"])


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (float, or from ``smallify.quantize`` / ``smallify.qat``) as a .smallify file."""
    onnx_io.check_writable(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    layers = {}
    for name, m in _twins(model):
        spec = m.spec
        layers[name] = {"spec": _spec_dict(spec), "shape": list(m.weight.shape)}
        if spec.fmt is None:
            continue
        values, scale, zero = m.stored()
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight_scale"] = scale.detach().contiguous().clone()
        if isinstance(spec.fmt, FloatFormat):
            tensors[f"{name}.weight:fp8"] = values.contiguous()
        else:
            tensors[f"{name}.weight:packed"] = torch.from_numpy(pack(values.numpy(), spec.fmt.bits, spec.fmt.qmin))
            if spec.fmt.symmetric:
                del tensors[f"{name}.weight_zero_point"]    # fixed by the grid: rebuilt on load
            else:
                tensors[f"{name}.weight_zero_point"] = torch.from_numpy(
                    pack(zero.numpy(), spec.fmt.bits, spec.fmt.qmin))
    sparse = {}
    for key in list(tensors):
        t = tensors[key]
        if t.is_floating_point() and t.ndim >= 2 and t.numel() >= 256 and float((t == 0).float().mean()) >= SPARSE_MIN:
            mask = (t != 0).flatten()
            tensors[f"{key}:sparse_mask"] = torch.from_numpy(np.packbits(mask.numpy()))
            tensors[f"{key}:sparse_values"] = t.flatten()[mask].contiguous()
            sparse[key] = list(t.shape)
            del tensors[key]
    config = getattr(model, "quant_config", None)
    manifest = {"format": FORMAT, "version": VERSION, "config": config.to_dict() if config is not None else None,
                "layers": layers, "sparse": sparse}
    removed = removed_branches(model)
    if removed:
        manifest["removed_branches"] = removed
    return onnx_io.write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"smallify": json.dumps(manifest)}))


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ModelError(f"{path} is not a .smallify (safetensors) file: {e}") from None
    manifest = json.loads(meta.get("smallify", "null") or "null")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is a safetensors file without a smallify manifest; save it with smallify.save")
    if manifest.get("version", 0) > VERSION:
        raise ModelError(f"{path} was written by a newer smallify (container version {manifest['version']})")
    return manifest


def _config_from(d: dict | None):
    from smallify.quant.config import Float16, FP8Static, Int8Static, WeightOnly
    from smallify.quant.dynamic import Int8Dynamic

    if d is None:
        return None
    kinds = {c.kind: c for c in (Int8Static, FP8Static, Int8Dynamic, WeightOnly, Float16)}
    if d.get("kind") not in kinds:
        raise ModelError(f"unknown config kind {d.get('kind')!r} in the manifest; accepted: {sorted(kinds)}")
    return kinds[d["kind"]].from_dict(d)


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the saved model on ``model`` (the float architecture, e.g. from your model factory): the
    compressed structure is made from the manifest, then every tensor is filled from the file."""
    from smallify.quant.config import Float16, WeightOnly
    from smallify.quant.dynamic import Int8Dynamic, dynamic_module
    from smallify.quant.weight_only import fold_batchnorm, half_module

    manifest = read_manifest(path)
    config = _config_from(manifest["config"])
    if manifest.get("removed_branches"):
        model = remove_branches(model, manifest["removed_branches"])
    if config is None:
        target = model
    elif isinstance(config, Float16):
        target = half_module(model, config)
    elif isinstance(config, Int8Dynamic):
        target = dynamic_module(model, config)
    elif isinstance(config, WeightOnly):
        target = fold_batchnorm(model)
        target.quant_config = config
    else:
        from smallify.quant.ptq import quantize_module

        target = quantize_module(model, config, None, progress=False)
    for name, info in manifest["layers"].items():
        if isinstance(config, WeightOnly):
            try:
                m = target.get_submodule(name)
            except AttributeError:
                raise ModelError(f"the model has no layer {name!r} that the file holds; is it the same architecture?") from None
            qmod.replace_module(target, name, qmod.lookup(m).from_float(m, _spec_from(info["spec"])))
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    for key, shape in manifest.get("sparse", {}).items():
        count = int(torch.Size(shape).numel())
        mask = torch.from_numpy(np.unpackbits(state.pop(f"{key}:sparse_mask").numpy())[:count].astype(bool))
        values = state.pop(f"{key}:sparse_values")
        dense = torch.zeros(count, dtype=values.dtype)
        dense[mask] = values
        state[key] = dense.reshape(shape)
    for name, info in manifest["layers"].items():
        spec = _spec_from(info["spec"])
        m = target.get_submodule(name)
        if spec.fmt is None:
            continue
        scale = state[f"{name}.weight_scale"]
        if isinstance(spec.fmt, FloatFormat):
            w = state.pop(f"{name}.weight:fp8").to(torch.float32) * qmod.broadcast_param(scale, spec, len(info["shape"]))
        else:
            count = int(torch.Size(info["shape"]).numel())
            values = torch.from_numpy(unpack(state.pop(f"{name}.weight:packed").numpy(), spec.fmt.bits,
                                             spec.fmt.qmin, count)).reshape(info["shape"])
            if spec.fmt.symmetric:
                zero = torch.full_like(scale, m.weight_zero_point.flatten()[0].item(), dtype=torch.int32)
            else:
                zero = torch.from_numpy(unpack(state[f"{name}.weight_zero_point"].numpy(), spec.fmt.bits,
                                               spec.fmt.qmin, scale.numel())).reshape(scale.shape)
            state[f"{name}.weight_zero_point"] = zero
            w = dequantize(values, qmod.broadcast_param(scale, spec, values.ndim), qmod.broadcast_param(zero, spec, values.ndim))
        state[f"{name}.weight"] = w
    fit_shapes(target, state)
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"the file does not fit the model: missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}; build the same architecture the file was saved from")
    return target.eval()


def fit_shapes(model: nn.Module, state: dict) -> None:
    """Resize Conv2d / Linear / BatchNorm layers to the shapes in ``state`` (a channel-pruned model saved
    from the same architecture): the file's shapes are the truth, the factory's the starting point."""
    for name, m in model.named_modules():
        w = state.get(f"{name}.weight")
        if isinstance(m, nn.Conv2d) and w is not None and w.shape != m.weight.shape and w.ndim == 4:
            depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
            m.out_channels = w.shape[0]
            m.in_channels = w.shape[0] if depthwise else w.shape[1] * m.groups
            if depthwise:
                m.groups = w.shape[0]
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(w.shape[0]))
        elif isinstance(m, nn.Linear) and w is not None and w.shape != m.weight.shape and w.ndim == 2:
            m.out_features, m.in_features = w.shape
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(w.shape[0]))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" in state:
            n = state[f"{name}.running_mean"].shape[0]
            if n != m.num_features:
                m.num_features = n
                if m.affine:
                    m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
                m.running_mean, m.running_var = torch.empty(n), torch.empty(n)
