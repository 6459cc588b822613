"""The command line: ``smallify quantize | bench | demo``. Bad input: one line on stderr, exit status 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from smallify.errors import SmallifyError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Make trained neural networks small and fast, and measure it.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"smallify: error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def quantize(
    input: Path = typer.Argument(..., help="float ONNX model (.onnx)"),
    calib: Path = typer.Option(..., "--calib", help=".npz with one array per model input (samples on axis 0)"),
    out: Path = typer.Option(..., "--out", help="where to write the INT8 QDQ ONNX model"),
    skip: list[str] = typer.Option([], "--skip", help="layer name pattern (fnmatch) to keep in float; repeatable"),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="one weight scale per layer instead of per channel"),
    calibration: str = typer.Option("minmax", "--calibration",
                                    help="activation range: minmax | percentile | entropy | mse"),
    scheme: str = typer.Option("auto", "--scheme",
                               help="auto | cnn (integer chains) | transformer (MatMul inputs only)"),
    percentile: float = typer.Option(99.99, "--percentile", help="with --calibration percentile"),
    activation_dtype: str = typer.Option("uint8", "--activation-dtype", help="uint8 (fast on x86) | int8"),
    smooth_quant: str = typer.Option("auto", "--smooth-quant",
                                     help="auto (0.8 for transformers) | off | alpha in [0, 1]"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="calibrate on at most this many samples"),
):
    """Quantize an ONNX model to INT8 (QDQ), calibrating activations on CALIB."""
    from smallify.api import quantize as quantize_verb
    from smallify.quant.config import Int8Static

    try:
        smooth = {"auto": "auto", "off": None}.get(smooth_quant, smooth_quant)
        if isinstance(smooth, str) and smooth != "auto":
            try:
                smooth = float(smooth)
            except ValueError:
                smooth = smooth_quant   # Int8Static names the accepted values
        config = Int8Static(calibration=calibration, percentile=percentile, per_channel=not per_tensor,
                            activation_dtype=activation_dtype, skip=tuple(skip), max_calibration_samples=max_samples,
                            scheme=scheme, smooth_quant=smooth)
        result = quantize_verb(str(input), config, str(calib), out=str(out), progress=sys.stderr.isatty())
    except SmallifyError as e:
        _fail(str(e))
    from smallify.measure import file_size, format_bytes

    typer.echo(str(result.report))
    typer.echo(f"wrote {out} ({format_bytes(file_size(out))}; float model {format_bytes(file_size(input))})")


@app.command()
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX models taking the same inputs; ratios are to the first"),
    threads: int = typer.Option(2, "--threads", help="intra-op threads for every model"),
    batch: list[int] = typer.Option([1, 32], "--batch", help="batch sizes to time; repeatable"),
    budget: float = typer.Option(10.0, "--budget", help="seconds of timing per batch size"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the table as JSON"),
    runtime: list[str] = typer.Option(["onnxruntime"], "--runtime",
                                      help="onnxruntime | openvino; repeat to time both side by side"),
):
    """Size on disk and latency (median, p90) of ONNX models, interleaved in one run."""
    from smallify.bench import bench_onnx_files, print_table, write_json

    try:
        rows = bench_onnx_files([str(m) for m in models], batch, threads, budget, tuple(runtime))
    except SmallifyError as e:
        _fail(str(e))
    print_table(rows, f"{' + '.join(runtime)} CPU, {threads} thread(s); ratios to the first row")
    if json_out:
        write_json(rows, json_out)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", help="folder for the ONNX files and results.json"),
    threads: int = typer.Option(2, "--threads"),
    data: Optional[Path] = typer.Option(None, "--data", help="folder with the Fashion-MNIST IDX files"),
):
    """Quantize the bundled Fashion-MNIST ResNet to INT8 and compare it with FP32, side by side."""
    from smallify.examples.demo import run_demo

    try:
        run_demo(out, threads, data)
    except SmallifyError as e:
        _fail(str(e))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
