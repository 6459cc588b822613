"""``smallify decompose``: low-rank decomposition from the command line (svd, spatial, tucker, separable; a fixed
rank, an energy, or one MAC / parameter budget), written as a .smallify file and optionally ONNX.

Registered on ``smallify.cli.app``; the model, weights and example-batch helpers are ``prune``'s, the run check
and the size lines ``cluster``'s.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from smallify.errors import ConfigError, SmallifyError

RUNTIMES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "none": None}


def parse_rank(value: Optional[str]):
    """``--rank``: an integer (that rank), a fraction (that share of each layer's full rank) or 'vbmf'; LowRank
    checks the range and names what is accepted."""
    if value is None:
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def make_config(method: str, rank: Optional[str], energy: Optional[float], macs: Optional[float],
                params: Optional[float], round_to: int, layers: tuple[str, ...], skip: tuple[str, ...],
                runtime: str, batch: int, threads: int):
    """The LowRank config the command-line options name (ConfigError naming the option otherwise)."""
    from smallify.lowrank import LowRank
    from smallify.lowrank.factor import METHODS

    if method not in ("auto",) + METHODS:
        raise ConfigError(f"--method {method!r} is not supported; accepted: {', '.join(('auto',) + METHODS)}")
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r} is not supported; accepted: {', '.join(RUNTIMES)}")
    given = [f"--{n}" for n, v in (("rank", rank), ("energy", energy), ("macs", macs), ("params", params))
             if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of --rank, --energy, --macs, --params; got {', '.join(given)}")
    return LowRank(method=method, rank=parse_rank(rank), energy=energy, macs=macs, params=params, round_to=round_to,
                   layers=layers, skip=skip, runtime=RUNTIMES[runtime], batch=batch, threads=threads)


def decompose(
    model: str = typer.Option("example", "--model", help="'example' (bundled Fashion-MNIST ResNet) or "
                                "package.module:factory"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="safetensors / .smallify weights for MODEL"),
    out: Path = typer.Option(..., "--out", help="the decomposed model (.smallify: load it with smallify.load "
                             "or as --student-weights)"),
    onnx_out: Optional[Path] = typer.Option(None, "--onnx", help="also export the model to ONNX (plain smaller "
                                            "layers)"),
    method: str = typer.Option("auto", "--method", help="auto | svd (Linear, 1x1) | spatial (k x 1 then 1 x k) "
                               "| tucker (1x1, core, 1x1) | separable (depthwise + pointwise)"),
    rank: Optional[str] = typer.Option(None, "--rank", help="N (every layer), a fraction in (0, 1) of each "
                                       "layer's full rank, or vbmf (tucker, auto)"),
    energy: Optional[float] = typer.Option(None, "--energy", help="in (0, 1]: smallest rank whose relative "
                                           "output error is at most 1 - energy (default 0.95)"),
    macs: Optional[float] = typer.Option(None, "--macs", help="in (0, 1): kept share of the model's MACs"),
    params: Optional[float] = typer.Option(None, "--params", help="in (0, 1): kept share of the parameters"),
    round_to: int = typer.Option(8, "--round-to", help="ranks are multiples of this"),
    layers: list[str] = typer.Option([], "--layers", help="only these layers (fnmatch pattern); repeatable"),
    skip: list[str] = typer.Option([], "--skip", help="never these layers (fnmatch pattern); repeatable"),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime | openvino: keep only layers "
                                "that got faster there | none: no timing"),
    batch: int = typer.Option(1, "--batch", help="batch size of the speed check"),
    threads: int = typer.Option(2, "--threads", help="threads of the speed check"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz of inputs: activation-aware ranks, "
                                         "refits, MACs, the speed check's shapes (default for the example: "
                                         "512 training images)"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1,3,224,224 (ONNX export)"),
):
    """Write Linear and Conv2d layers as smaller layers in a row (low-rank decomposition); a layer is replaced
    only where it got faster on --runtime."""
    from smallify.cli import _fail
    from smallify.cli_inputs import calibration_inputs, check_outputs, example_batch, model_from
    from smallify.cluster.cli import check_runs, float_size, size_lines
    from smallify.data import load_npz
    from smallify.files import write_all
    from smallify.lowrank import decompose as decompose_verb
    from smallify.pack import save

    try:
        check_outputs(out, onnx_out, (weights, calib))
        config = make_config(method, rank, energy, macs, params, round_to, tuple(layers), tuple(skip), runtime,
                             batch, threads)
        net = model_from(model, weights, "model")
        arrays = load_npz(calib) if calib is not None else None
        data = calibration_inputs(model, arrays)
        if data is None and (config.runtime is not None or config.macs is not None):
            need = f"--runtime {runtime}" if config.runtime is not None else "--macs"
            raise ConfigError(f"{need} needs --calib data.npz (inputs the model takes: each layer's input shape); "
                              "or give --runtime none" + (" and --params instead of --macs" if macs is not None else ""))
        if data is not None:
            check_runs(net, data[:1])
        example = example_batch(model, input_shape, arrays) if onnx_out is not None else None
        if example is not None:
            check_runs(net, example[:1])
        small = decompose_verb(net, config, data=data, progress=sys.stderr.isatty())
        writers = {out: lambda tmp: save(small, tmp)}
        if onnx_out is not None:
            from smallify.export.onnx import export_onnx

            writers[onnx_out] = lambda tmp: export_onnx(small, tmp, example[:1])
        write_all(writers)      # both files or neither
        reference = float_size(net)
    except SmallifyError as e:
        _fail(str(e))
    typer.echo(str(small.report))
    typer.echo(size_lines(out, reference)[0])     # (the byte breakdown is all 'float' here)
    if onnx_out is not None:
        from smallify.measure import format_bytes

        typer.echo(f"wrote {onnx_out} ({format_bytes(onnx_out.stat().st_size)}: ONNX)")
