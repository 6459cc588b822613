"""save(model, path) / load(path, model): compressed PyTorch models on disk, really compressed.

Layout: one safetensors file. Weights on an integer grid are bit-packed (``quant/packing.py``: b bits per
weight) under ``<layer>.weight:packed``, FP8 weights are float8 tensors; symmetric grids store no zero points;
float tensors that are at least half zeros (pruned) are stored as a bit mask and their nonzero values; scales, zero points, biases and every other tensor are stored as they are. The
safetensors metadata holds the manifest: the config that made the model, each layer's grid, the residual
branches pruning removed (``prune/branches.py``; rebuilt by the same graph rewrite) and the layers low-rank
decomposition split into smaller ones (``lowrank/modules.py``: each part's type and shape). ``load`` builds
the compressed structure from the manifest on a float model the caller constructs (so no code is read from
the file), then fills it: the output equals the saved model's.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from smallify import files
from smallify.errors import ConfigError, ModelError, SmallifyError, first_line
from smallify.pack.blob import bundle_small, unbundle_small
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


def _spec_from(d, layer: str = "?") -> qmod.WeightSpec:
    """A layer's grid from the manifest, every field checked (ModelError naming the layer)."""
    def field(key, kinds, what):
        value = d.get(key) if isinstance(d, dict) else None
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise ModelError(f"the manifest's grid of layer {layer!r} has {key}={value!r}; accepted: {what}")
        return value

    fmt = field("fmt", (str,), "'float', 'fp8' or 'int'")
    try:
        if fmt == "float":
            return qmod.WeightSpec(None)
        if fmt == "fp8":
            return qmod.WeightSpec(FloatFormat(field("name", (str,), "an fp8 format name")),
                                   field("per_channel", (bool,), "true or false"))
        if fmt == "int":
            group = d.get("group_size")
            if group is not None:
                group = field("group_size", (int,), "an integer >= 2 or null")
            return qmod.WeightSpec(IntFormat(field("bits", (int,), "an integer 2..8"),
                                             field("signed", (bool,), "true or false"),
                                             field("symmetric", (bool,), "true or false")),
                                   field("per_channel", (bool,), "true or false"), group)
    except ConfigError as e:
        raise ModelError(f"the manifest's grid of layer {layer!r} is invalid: {e}") from None
    raise ModelError(f"the manifest's grid of layer {layer!r} has fmt={fmt!r}; accepted: 'float', 'fp8' or 'int'")


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (float, or from ``smallify.quantize`` / ``smallify.qat``) as a .smallify file."""
    files.check_writable(path)
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
    aliases, first_of = {}, {}
    for key, t in model.state_dict().items():     # tied weights (an LM head sharing the embedding) stored once
        if key in tensors and t.numel() > 0:
            ident = (t.data_ptr(), tuple(t.shape), t.dtype)
            if ident in first_of:
                aliases[key] = first_of[ident]
                del tensors[key]
            else:
                first_of[ident] = key
    from smallify.pack import shared as shared_records

    shared = shared_records.save_records(model, tensors)
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
    if aliases:
        manifest["aliases"] = aliases
    if shared:
        manifest["shared"] = shared
    cluster_config = getattr(model, "cluster_config", None)
    if cluster_config is not None:
        manifest["cluster_config"] = cluster_config.to_dict()
    from smallify.cluster.hashing import hashed_layers

    hashed = hashed_layers(model)
    if hashed:      # buckets only: the hashes are rebuilt from the config's seed
        if cluster_config is None or cluster_config.kind != "hash_share":
            raise ConfigError("a model with hashed layers needs its HashShare config as model.cluster_config "
                              "(set by smallify.cluster) to be saved")
        manifest["hashed"] = hashed
    manifest["bytes"] = breakdown(tensors, shared)
    small = bundle_small(tensors)
    if small:
        manifest["small"] = small
    removed = removed_branches(model)
    if removed:
        manifest["removed_branches"] = removed
    from smallify.lowrank.modules import decomposed_layers

    decomposed = decomposed_layers(model)
    if decomposed or getattr(model, "decompose_report", None) is not None:
        manifest["decomposed"] = decomposed     # also when none was replaced: decompose folded the BatchNorms
    return files.write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"smallify": json.dumps(manifest, separators=(",", ":"))}))


def breakdown(tensors: dict, shared: dict) -> dict[str, int]:
    """Bytes of the file's tensors by kind: 'indices' (coded index streams), 'codebooks' (of shared layers),
    'packed' (integer grids), 'sparse' (masks and nonzeros of pruned float tensors), 'float' (the rest)."""
    out = {"indices": 0, "codebooks": 0, "packed": 0, "sparse": 0, "float": 0}
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        layer, _, leaf = key.split(":")[0].rpartition(".")
        if key.endswith(":coded"):
            out["indices"] += n
        elif layer in shared and leaf in ("codebook", "codebook_scale", "scale", "levels"):
            out["codebooks"] += n
        elif ":sparse" in key:
            out["sparse"] += n
        elif ":packed" in key or key.endswith("_zero_point") or key.endswith("weight_scale") or ":fp8" in key:
            out["packed"] += n
        else:
            out["float"] += n
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a .smallify file, every field's type checked; ModelError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file; give a .smallify file written by smallify.save")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:   # safetensors checks the header's offsets, dtypes and shapes against the file
        raise ModelError(f"{path} is not a .smallify (safetensors) file ({first_line(e)}); "
                         "write it with smallify.save") from None
    try:
        manifest = json.loads(meta.get("smallify", "null") or "null")
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path} has a manifest that is not valid JSON ({first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is a safetensors file without a smallify manifest; save it with smallify.save")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelError(f"{path} has container version {version!r}; accepted: an integer 1..{VERSION}")
    if version > VERSION:
        raise ModelError(f"{path} was written by a newer smallify (container version {version}); this one "
                         f"reads versions 1..{VERSION}: upgrade smallify")
    _check_manifest(manifest, path)
    return manifest


def _shape_ok(shape) -> bool:
    return (isinstance(shape, list) and 1 <= len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**40 for d in shape))


def _check_manifest(manifest: dict, path: Path) -> None:
    config = manifest.get("config")
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("kind"), str)):
        raise ModelError(f"{path}: the manifest's config is {str(config)[:80]!r}; accepted: null or an object "
                         "with a 'kind'")
    layers, sparse = manifest.get("layers", {}), manifest.get("sparse", {})
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ModelError(f"{path}: the manifest's 'layers' is not an object of layer records")
    for name, info in layers.items():
        if not _shape_ok(info.get("shape")):
            raise ModelError(f"{path}: the manifest gives layer {name!r} the shape {info.get('shape')!r}; "
                             "accepted: a list of 1 to 8 positive integers")
        _spec_from(info.get("spec"), name)
    if not isinstance(sparse, dict) or not all(_shape_ok(v) for v in sparse.values()):
        raise ModelError(f"{path}: the manifest's 'sparse' is not an object of tensor shapes (lists of positive "
                         "integers)")
    branches = manifest.get("removed_branches", [])
    if not (isinstance(branches, list) and all(
            isinstance(b, list) and len(b) == 2 and isinstance(b[0], str) and b[1] in (0, 1)
            and not isinstance(b[1], bool) for b in branches)):
        raise ModelError(f"{path}: the manifest's 'removed_branches' is {str(branches)[:80]!r}; accepted: a list "
                         "of [residual sum name, 0 or 1] pairs")


def _config_from(d: dict | None):
    """The manifest's config, its class found by kind in the config registry (``smallify.config``): every
    config of ``quantize``."""
    from smallify.config import config_from_dict, configs_of

    if d is None:
        return None
    kinds = sorted(c.kind for c in configs_of("quantize"))
    if d.get("kind") not in kinds:
        raise ModelError(f"unknown config kind {d.get('kind')!r} in the manifest; accepted: {kinds}")
    if d.get("kind") in ("int8_static", "mixed_precision", "int8_dynamic") and "reduce_range" not in d:
        d = {**d, "reduce_range": False}   # files written before reduce_range existed hold 8-bit grids
    try:
        return config_from_dict(d, "quantize")
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:   # ConfigError included
        raise ModelError(f"the manifest's {d['kind']} config is invalid: {first_line(e)}") from None



def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the saved model on ``model`` (the float architecture, e.g. from your model factory): the
    compressed structure is made from the manifest, then every tensor is filled from the file.

    Nothing from the file is executed (JSON and raw tensors only). Every record is checked before it is
    used: the manifest's types, each packed tensor's length against the shape the manifest gives, mask
    lengths, scales (finite, positive), dtypes; anything that does not fit is a ModelError naming it."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load(path, model) needs the float architecture as a torch.nn.Module; got "
                          f"{type(model).__name__}")
    path = Path(path)
    manifest = read_manifest(path)
    config = _config_from(manifest.get("config"))
    try:
        return _rebuild(path, manifest, config, model)
    except SmallifyError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        raise ModelError(f"{path} does not fit this model or is corrupt ({first_line(e)}); build the "
                         "architecture the file was saved from") from None


def _half(model: nn.Module, config, specs: dict) -> nn.Module:
    from smallify.quant.weight_only import half_module

    return half_module(model, config)


def _dynamic(model: nn.Module, config, specs: dict) -> nn.Module:
    from smallify.quant.dynamic import dynamic_module

    return dynamic_module(model, config)


def _weight_only(model: nn.Module, config, specs: dict) -> nn.Module:
    """BatchNorms folded, then every layer the file holds becomes its twin on the file's grid."""
    from smallify.quant.weight_only import fold_batchnorm

    target = fold_batchnorm(model)
    target.quant_config = config
    modules = dict(target.named_modules())
    for name, spec in specs.items():
        m = _layer(modules, name)
        if qmod.lookup(m) is None:
            raise ModelError(f"layer {name!r} of the model ({type(m).__name__}) has no quantized form; the "
                             "file was saved from another architecture")
        qmod.replace_module(target, name, qmod.lookup(m).from_float(m, spec))
    return target


def _static(model: nn.Module, config, specs: dict) -> nn.Module:
    from smallify.quant.ptq import quantize_module

    return quantize_module(model, config, None, progress=False)


# How ``load`` builds the compressed structure a manifest's config names, before the tensors are filled:
# config kind -> fn(float model, config, {layer: WeightSpec}) -> model, found along the config class's MRO
# (MixedPrecision and FP8Static are rebuilt as the Int8Static they subclass).
STRUCTURES: dict[str, Callable[[nn.Module, object, dict], nn.Module]] = {
    "float16": _half, "int8_dynamic": _dynamic, "weight_only": _weight_only, "int8_static": _static,
    "llm_weight_only": _weight_only}


def _structure(config) -> Callable[[nn.Module, object, dict], nn.Module]:
    for klass in type(config).__mro__:
        build = STRUCTURES.get(klass.__dict__.get("kind"))
        if build is not None:
            return build
    raise ModelError(f"this smallify cannot rebuild a model quantized with {type(config).__name__} "
                     f"(kind {config.kind!r}); it rebuilds kinds {sorted(STRUCTURES)} and their subclasses")


def _layer(modules: dict, name: str) -> nn.Module:
    if name not in modules:
        raise ModelError(f"the model has no layer {name!r} that the file holds; is it the same architecture?")
    return modules[name]


def _rebuild(path: Path, manifest: dict, config, model: nn.Module) -> nn.Module:
    layers = manifest.get("layers", {})
    specs = {name: _spec_from(info["spec"], name) for name, info in layers.items()}
    if manifest.get("removed_branches"):
        model = remove_branches(model, manifest["removed_branches"])
    if "decomposed" in manifest:
        from smallify.lowrank.modules import rebuild as rebuild_decomposed

        model = rebuild_decomposed(model, manifest["decomposed"], path)
    shared = manifest.get("shared") or {}
    if shared:
        from smallify.pack.shared import rebuild

        model = rebuild(model, shared, path)
    if manifest.get("hashed"):
        from smallify.cluster.hashing import rebuild_hashed
        from smallify.config import config_from_dict

        names = manifest["hashed"]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ModelError(f"{path}: the manifest's 'hashed' must be a list of layer names")
        model = rebuild_hashed(model, config_from_dict(manifest.get("cluster_config") or {}, "cluster"), names)
    target = model if config is None else _structure(config)(model, config, specs)
    modules = dict(target.named_modules())
    for name in layers:
        _layer(modules, name)
    modules = dict(target.named_modules())
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    if "small" in manifest:
        unbundle_small(state, manifest["small"], path)
    for key, shape in manifest.get("sparse", {}).items():
        count = math.prod(shape)
        mask, values = state.pop(f"{key}:sparse_mask", None), state.pop(f"{key}:sparse_values", None)
        if mask is None or values is None:
            raise ModelError(f"{path}: the manifest lists {key!r} as sparse but the file lacks its mask or values")
        if mask.dtype != torch.uint8 or mask.ndim != 1 or mask.numel() != (count + 7) // 8:
            raise ModelError(f"{path}: the mask of {key!r} holds {mask.numel()} {mask.dtype} byte(s); the manifest's "
                             f"shape {shape} needs {(count + 7) // 8} uint8 bytes")
        bits = torch.from_numpy(np.unpackbits(mask.numpy())[:count].astype(bool))
        if values.ndim != 1 or values.numel() != int(bits.sum()) or not values.is_floating_point():
            raise ModelError(f"{path}: {key!r} has {values.numel()} stored value(s) ({values.dtype}); its mask "
                             f"marks {int(bits.sum())} nonzero float values")
        dense = torch.zeros(count, dtype=values.dtype)
        dense[bits] = values
        state[key] = dense.reshape(shape)
    if shared:
        from smallify.pack.shared import decode_records

        decode_records(state, shared, path)
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict):
        raise ModelError(f"{path}: the manifest's aliases must map tensor names to tensor names")
    for key, source in aliases.items():
        if not isinstance(source, str) or source not in state:
            raise ModelError(f"{path}: tensor {key!r} is stored as {source!r}, which the file does not hold")
        state[key] = state[source]
    for name, info in layers.items():
        spec, m = specs[name], modules[name]
        if spec.fmt is None:
            continue
        shape = info["shape"]
        if not isinstance(getattr(m, "spec", None), qmod.WeightSpec):
            raise ModelError(f"{path}: layer {name!r} is stored quantized but the manifest's config "
                             f"({(manifest.get('config') or {}).get('kind')}) leaves it a {type(m).__name__}")
        scale = _tensor(state, f"{name}.weight_scale", path)
        if not scale.is_floating_point() or scale.numel() == 0 or not bool(torch.isfinite(scale).all()) \
                or not bool((scale > 0).all()):
            raise ModelError(f"{path}: the scale of layer {name!r} ({scale.dtype}, {scale.numel()} value(s)) must "
                             "be finite positive floats")
        count = math.prod(shape)
        if isinstance(spec.fmt, FloatFormat):
            values = _tensor(state, f"{name}.weight:fp8", path, pop=True)
            if values.dtype != spec.fmt.torch_dtype or list(values.shape) != shape:
                raise ModelError(f"{path}: the fp8 weight of layer {name!r} is {values.dtype} {list(values.shape)}; "
                                 f"the manifest says {spec.fmt.torch_dtype} {shape}")
            w = values.to(torch.float32) * qmod.broadcast_param(scale, spec, len(shape))
        else:
            packed = _tensor(state, f"{name}.weight:packed", path, pop=True)
            need = (count * spec.fmt.bits + 7) // 8
            if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != need:
                raise ModelError(f"{path}: the packed weight of layer {name!r} holds {packed.numel()} {packed.dtype} "
                                 f"value(s); shape {shape} at {spec.fmt.bits} bits needs {need} uint8 bytes")
            values = torch.from_numpy(unpack(packed.numpy(), spec.fmt.bits, spec.fmt.qmin, count)).reshape(shape)
            if spec.fmt.symmetric:
                zero = torch.full_like(scale, m.weight_zero_point.flatten()[0].item(), dtype=torch.int32)
            else:
                zp = _tensor(state, f"{name}.weight_zero_point", path)
                need = (scale.numel() * spec.fmt.bits + 7) // 8
                if zp.dtype != torch.uint8 or zp.ndim != 1 or zp.numel() != need:
                    raise ModelError(f"{path}: the zero points of layer {name!r} hold {zp.numel()} {zp.dtype} "
                                     f"value(s); {scale.numel()} scale(s) at {spec.fmt.bits} bits need {need} bytes")
                zero = torch.from_numpy(unpack(zp.numpy(), spec.fmt.bits, spec.fmt.qmin, scale.numel())).reshape(scale.shape)
            state[f"{name}.weight_zero_point"] = zero
            w = dequantize(values, qmod.broadcast_param(scale, spec, values.ndim), qmod.broadcast_param(zero, spec, values.ndim))
        if list(w.shape) != shape:
            raise ModelError(f"{path}: the scales of layer {name!r} do not fit its weight of shape {shape}")
        state[f"{name}.weight"] = w
    fit_shapes(target, state)
    expected = target.state_dict()
    for key, t in state.items():
        if key in expected and tuple(t.shape) != tuple(expected[key].shape):
            raise ModelError(f"{path}: tensor {key!r} has shape {tuple(t.shape)} in the file; the model's is "
                             f"{tuple(expected[key].shape)}: build the architecture the file was saved from")
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"the file does not fit the model: missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}; build the same architecture the file was saved from")
    cluster_config = manifest.get("cluster_config")
    if cluster_config is not None:
        from smallify.config import config_from_dict

        target.cluster_config = config_from_dict(cluster_config, "cluster")
    return target.eval()


def _tensor(state: dict, key: str, path: Path, pop: bool = False) -> torch.Tensor:
    if key not in state:
        raise ModelError(f"{path}: the manifest needs tensor {key!r}, which the file does not hold")
    return state.pop(key) if pop else state[key]


def fit_shapes(model: nn.Module, state: dict) -> None:
    """Resize the layers of ``model`` to the shapes in ``state`` (a channel-pruned model saved from the same
    architecture), with the per-layer-type resize handlers channel pruning uses (``prune/resize.py``)."""
    from smallify.prune.resize import fit_shapes as fit

    fit(model, state)
