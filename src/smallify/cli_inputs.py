"""What a command reads and writes, checked before any work: models named 'example' or 'package.module:factory'
(+ safetensors / .smallify weights), calibration inputs, example batches for tracing, and output paths. Shared by
``smallify prune``, ``cluster``, ``decompose`` and ``distill`` (``cli.py``, ``cluster/cli.py``, ``lowrank/cli.py``)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from smallify.errors import ConfigError, ModelError, OutputError, SmallifyError


def load_callable(spec: str, what: str):
    """``package.module:function`` -> the function (the current folder is importable)."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{what} {spec!r} must look like package.module:function")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load {what} {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r} is not callable")
    return fn


def model_from(spec: str, weights: Optional[Path], what: str):
    """'example' (the bundled Fashion-MNIST ResNet, trained) or 'package.module:factory' (+ weights)."""
    if spec == "example":
        from smallify.examples.demo import pretrained_fmnist_resnet

        model = pretrained_fmnist_resnet()
    else:
        model = load_callable(spec, f"--{what}")()
        import torch

        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"--{what} {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        from smallify.pack import load

        if str(weights).endswith(".safetensors") and not has_manifest(weights):
            from safetensors.torch import load_file

            from smallify.pack import fit_shapes

            if not weights.is_file():
                raise ModelError(f"weights file {weights} does not exist")
            try:
                state = load_file(str(weights))
            except Exception as e:    # safetensors' own errors: a cut or foreign file
                raise ModelError(f"{weights} is not a readable safetensors file ({(str(e).strip() or type(e).__name__).splitlines()[0][:160]}); "
                                 "accepted: safetensors or .smallify weights") from None
            try:
                fit_shapes(model, state)
                model.load_state_dict(state)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                raise ConfigError(f"{weights} does not fit {spec}: {str(e).splitlines()[0]}") from None
        else:
            model = load(weights, model)
    return model.eval()


def has_manifest(path: Path) -> bool:
    from smallify.pack.container import read_manifest

    try:
        read_manifest(path)
        return True
    except SmallifyError:
        return False


def check_outputs(out: Path, onnx_out: Optional[Path], inputs: tuple) -> None:
    """Before any work: ``out`` (and ``onnx_out``) writable, never one of ``inputs``, and not one file."""
    from smallify.files import check_writable

    check_writable(out, inputs)
    if onnx_out is not None:
        if onnx_out.resolve() == out.resolve():
            raise OutputError(f"--onnx {onnx_out} and --out {out} name one file; give each output its own name")
        check_writable(onnx_out, inputs)


def calibration_inputs(model_spec: str, arrays):
    """The calibration inputs of a command: the first array of ``--calib``, else the bundled example's 512
    training images for the example model, else None."""
    import torch

    if arrays is not None:
        return torch.from_numpy(next(iter(arrays.values())))
    if model_spec == "example":
        from smallify.examples.demo import calibration_images

        return torch.from_numpy(calibration_images(512))
    return None


def example_batch(model_spec: str, input_shape: Optional[str], calib):
    """A batch to trace / export with: from ``--calib``, ``--input-shape`` (random), or the example's shape."""
    import torch

    if calib is not None:
        return torch.from_numpy(next(iter(calib.values()))[:2])
    if input_shape:
        try:
            dims = [int(d) for d in input_shape.split(",")]
        except ValueError:
            raise ConfigError(f"--input-shape {input_shape!r} must be comma-separated integers, e.g. 1,3,224,224") from None
        return torch.randn(*dims)
    if model_spec == "example":
        return torch.zeros(2, 1, 28, 28)
    raise ConfigError("give --input-shape (e.g. 1,3,224,224) or --calib so that the model can be traced")
