"""``smallify cluster``: weight sharing from the command line (k-means codebooks, binary / ternary / power-of-two
levels, the hashing trick), written as a .smallify file (codebooks + entropy-coded indices) and optionally ONNX.

Registered on ``smallify.cli.app``; the model, weights and example-batch helpers are ``prune``'s.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from smallify.errors import ConfigError, DataError, SmallifyError

METHODS = ("kmeans", "binary", "ternary", "power-of-two", "hash")
ONNX_FORMS = ("expand", "indices")


def make_config(method: str, clusters: Optional[int] = None, bits: Optional[int] = None,
                scope: Optional[str] = None, group_size: Optional[int] = None, init: Optional[str] = None,
                snap: Optional[str] = None, compression: Optional[float] = None, seed: Optional[int] = None,
                skip: tuple[str, ...] = ()):
    """The config the command-line options name; an option that does not apply to ``method`` is a ConfigError
    (it would otherwise be ignored silently)."""
    from smallify.cluster import Binary, HashShare, KMeans, PowerOfTwo, Ternary

    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not supported; accepted: {', '.join(METHODS)}")
    given = {"--clusters": clusters, "--bits": bits, "--scope": scope, "--group-size": group_size, "--init": init,
             "--snap": snap, "--compression": compression, "--seed": seed}
    applies = {"kmeans": ("--clusters", "--bits", "--scope", "--group-size", "--init", "--snap"),
               "binary": ("--scope", "--group-size"), "ternary": ("--scope", "--group-size"),
               "power-of-two": ("--bits", "--scope", "--group-size"), "hash": ("--compression", "--seed")}[method]
    extra = [name for name, value in given.items() if value is not None and name not in applies]
    if extra:
        raise ConfigError(f"{', '.join(extra)} does not apply to --method {method}; accepted for {method}: "
                          f"{', '.join(applies)}")
    if method == "hash":
        return HashShare(**_given(compression=compression, seed=seed), skip=skip)
    where = _given(scope=scope, group_size=group_size)
    if method == "kmeans":
        snaps = {"none": None, "int8": "int8"}
        if snap is not None and snap not in snaps:
            raise ConfigError(f"--snap {snap!r} is not supported; accepted: none, int8")
        return KMeans(**where, **_given(clusters=clusters, bits=bits, init=init), snap=snaps.get(snap), skip=skip)
    if method == "power-of-two":
        return PowerOfTwo(**where, **_given(bits=bits), skip=skip)
    return (Binary if method == "binary" else Ternary)(**where, skip=skip)


def _given(**options) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def describe_model(model) -> str:
    """The cluster report (``model.report``); for a hashed model, its layers and bucket counts."""
    report = getattr(model, "report", None)
    if report is not None:
        return str(report)
    from smallify.cluster.hashing import HashedTwin

    hashed = [(n, m) for n, m in model.named_modules() if isinstance(m, HashedTwin)]
    config = getattr(model, "cluster_config", None)
    lines = [f"{len(hashed)} layer(s) hashed" + (f" ({config.describe()})" if config is not None else "")]
    for name, m in hashed:
        weights = 1
        for d in m.weight_shape:
            weights *= d
        lines.append(f"  {name:40s} {m.float_type.__name__:10s} {m.num_buckets} buckets for {weights} weights")
    return "\n".join(lines)


def check_runs(model, example) -> None:
    """Before any long work: the model runs on the example input that the ONNX export will trace."""
    import torch

    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        message = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise DataError(f"the model does not run on an input of shape {list(example.shape)} ({message}); give "
                        "--input-shape or --calib data that the model takes") from None


def float_size(model) -> int:
    """Bytes of ``model`` saved as it is (float) with ``smallify.save``: the reference of the size ratio."""
    from smallify.pack import save

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "float.smallify"
        save(model, path)
        return path.stat().st_size


def size_lines(out: Path, reference: int) -> list[str]:
    from smallify.measure import format_bytes
    from smallify.pack.container import read_manifest

    size = out.stat().st_size
    parts = read_manifest(out).get("bytes") or {}
    lines = [f"wrote {out} ({format_bytes(size)}: {size:,} bytes, {reference / size:.1f}x smaller than the float "
             f"model saved the same way, {format_bytes(reference)})"]
    if parts:
        lines.append("  bytes: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    return lines


def cluster(
    model: str = typer.Option("example", "--model", help="'example' (bundled Fashion-MNIST ResNet) or "
                              "package.module:factory"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="safetensors / .smallify weights for --model"),
    out: Path = typer.Option(..., "--out", help="the weight-shared model (.smallify: codebooks + entropy-coded "
                             "indices; load it with smallify.load or as --student-weights)"),
    onnx_out: Optional[Path] = typer.Option(None, "--onnx", help="also export the model to ONNX"),
    onnx_form: str = typer.Option("expand", "--onnx-form", help="expand (float weights) | indices (codebook + "
                                  "index table in the graph: a smaller file)"),
    method: str = typer.Option("kmeans", "--method", help="kmeans | binary | ternary | power-of-two | hash"),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="kmeans: shared values per scope, 2..256 "
                                           "(default 16)"),
    bits: Optional[int] = typer.Option(None, "--bits", help="kmeans: 2^bits clusters (1..8); power-of-two: "
                                       "index bits (2..8, default 3)"),
    scope: Optional[str] = typer.Option(None, "--scope", help="one codebook per layer | channel | group "
                                        "(kmeans default layer; binary, ternary, power-of-two: channel)"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="scope group: weights per codebook "
                                             "along an output channel (must divide each channel's weights)"),
    init: Optional[str] = typer.Option(None, "--init", help="kmeans: linear (default) | density | kmeans++"),
    snap: Optional[str] = typer.Option(None, "--snap", help="kmeans: none (default) | int8 (codebooks on the "
                                       "INT8 grid)"),
    compression: Optional[float] = typer.Option(None, "--compression", help="hash: stored fraction of the "
                                                "weights, in (0, 1) (default 0.125)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="hash: the hashes' seed (default 0)"),
    skip: list[str] = typer.Option([], "--skip", help="layer name pattern (fnmatch) kept in float; repeatable"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz of inputs: kmeans importance weights "
                                         "(default for the example: 512 training images)"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1,3,224,224 (ONNX export)"),
):
    """Share weights: a few values per layer, channel or group (k-means codebooks, binary, ternary, powers of
    two) or hashed buckets; the file stores codebooks + entropy-coded indices."""
    from smallify.cli import _fail
    from smallify.cli_inputs import calibration_inputs, check_outputs, example_batch, model_from
    from smallify.cluster import cluster as cluster_verb
    from smallify.data import load_npz
    from smallify.files import write_all
    from smallify.pack import save

    try:
        check_outputs(out, onnx_out, (weights, calib))
        if onnx_form not in ONNX_FORMS:
            raise ConfigError(f"--onnx-form {onnx_form!r} is not supported; accepted: {', '.join(ONNX_FORMS)}")
        config = make_config(method, clusters, bits, scope, group_size, init, snap, compression, seed, tuple(skip))
        net = model_from(model, weights, "model")
        arrays = load_npz(calib) if calib is not None else None
        example = example_batch(model, input_shape, arrays) if onnx_out is not None else None
        if example is not None:
            check_runs(net, example[:1])
        data = calibration_inputs(model, arrays) if method == "kmeans" and config.weighted else None
        shared = cluster_verb(net, config, data=data, progress=sys.stderr.isatty())
        writers = {out: lambda tmp: save(shared, tmp)}
        if onnx_out is not None:
            from smallify.export.onnx import export_onnx

            writers[onnx_out] = lambda tmp: export_onnx(shared, tmp, example[:1], shared=onnx_form)
        write_all(writers)      # both files or neither
        reference = float_size(net)
    except SmallifyError as e:
        _fail(str(e))
    typer.echo(describe_model(shared))
    for line in size_lines(out, reference):
        typer.echo(line)
    if onnx_out is not None:
        from smallify.measure import format_bytes

        typer.echo(f"wrote {onnx_out} ({format_bytes(onnx_out.stat().st_size)}: ONNX, {onnx_form} form)")
