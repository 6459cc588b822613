"""The command line: ``smallify quantize | bench | demo``. Bad input: one line on stderr, exit status 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from smallify.cli_inputs import calibration_inputs, check_outputs, example_batch, load_callable, model_from
from smallify.errors import ConfigError, OutputError, SmallifyError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Make trained neural networks small and fast, and measure it.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"smallify: error: {message}", err=True)
    raise typer.Exit(code)


METHODS = ("int8", "dynamic", "fp8", "weight-only", "fp16", "bf16", "mixed")


def _group(value: str):
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--group-size {value!r} is not supported; accepted: an integer >= 2, auto, none") from None


def _smooth(value: str):
    smooth = {"auto": "auto", "off": None}.get(value, value)
    if isinstance(smooth, str) and smooth != "auto":
        try:
            return float(smooth)
        except ValueError:
            return value   # the config names the accepted values
    return smooth


@app.command()
def quantize(
    input: Path = typer.Argument(..., help="float ONNX model (.onnx), or a language model: a Hugging Face "
                                 "folder or a .gguf file"),
    out: Path = typer.Option(..., "--out", help="where to write the quantized model (ONNX file; for a language "
                             "model a Hugging Face folder, a .gguf or a .smallify file, see --format)"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz with one array per model input (samples on "
                                         "axis 0); needed by int8, fp8 and mixed. Language models: calibration "
                                         "text (.txt, or .jsonl with a 'text' field) for gptq and awq"),
    method: str = typer.Option("int8", "--method", help="int8 (static W8A8, default) | dynamic (int8 weights, activations quantized at run time) | fp8 | weight-only | fp16 | "
                               "bf16 | mixed (per-layer bits chosen to meet --max-drop). Language models: gptq "
                               "(default) | awq | awq+gptq | datafree (alias hqq: no calibration text) | rtn"),
    fmt: str = typer.Option("hf", "--format", help="language models: hf (Hugging Face folder, compressed-tensors "
                            "pack-quantized) | gguf (llama.cpp; needs a .gguf input) | smallify"),
    sym: bool = typer.Option(False, "--sym/--asym", help="language models: signed grid with zero point 0 (Q4_0) or "
                             "a zero point per group (Q4_1, default)"),
    lm_head: bool = typer.Option(False, "--lm-head/--no-lm-head", help="language models: quantize the output "
                                 "projection too (8-bit; untied from the embedding)"),
    samples: Optional[int] = typer.Option(None, "--samples", help="language models: calibration windows (32)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="language models: tokens per window (512)"),
    force: bool = typer.Option(False, "--force", help="language models: replace an existing output"),
    bits: Optional[int] = typer.Option(None, "--bits", help="weight bits, 2..8 (int8: 8; weight-only: 4)"),
    group_size: Optional[str] = typer.Option(None, "--group-size", help="weights per scale group: an integer, auto, or "
                                   "none (per output channel); weight-only defaults to auto"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="largest metric drop allowed (units of "
                                             "--eval); implies --method mixed"),
    size_budget: Optional[float] = typer.Option(None, "--size-budget", help="mixed: weight bytes as a fraction "
                                                "of all-INT8"),
    eval_fn: Optional[str] = typer.Option(None, "--eval", help="package.module:function taking an .onnx path, "
                                          "returning the metric (higher is better); for --max-drop"),
    skip: list[str] = typer.Option([], "--skip", help="layer name pattern (fnmatch) to keep in float; repeatable"),
    per_tensor: bool = typer.Option(False, "--per-tensor/--per-channel", metavar="",     # a flag: no value
                                    help="one weight scale per layer, or per output channel"),
    calibration: str = typer.Option("minmax", "--calibration",
                                    help="activation range: minmax | percentile | entropy | mse"),
    scheme: str = typer.Option("auto", "--scheme",
                               help="auto | cnn (integer chains) | transformer (MatMul inputs only)"),
    percentile: float = typer.Option(99.99, "--percentile", help="with --calibration percentile"),
    activation_dtype: str = typer.Option("uint8", "--activation-dtype", help="uint8 (fast on x86) | int8"),
    fp8_format: str = typer.Option("e4m3", "--fp8-format", help="fp8: e4m3 | e5m2"),
    smooth_quant: str = typer.Option("auto", "--smooth-quant",
                                     help="auto (0.8 for transformers) | off | alpha in [0, 1]"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="calibrate on at most this many samples"),
    reduce_range: str = typer.Option("auto", "--reduce-range", help="int8/dynamic weights on a 7-bit grid: auto "
                                     "(where this CPU has no VNNI/AMX and integer kernels saturate) | on | off"),
    check_speed: bool = typer.Option(False, "--check-speed/--no-check-speed", help="time the result against the "
                                     "float model in ONNX Runtime (each in its own process, batch 1 and 32) and say "
                                     "whether it is faster on this CPU"),
):
    """Quantize an ONNX model (INT8 QDQ by default, calibrating activations on CALIB), or the weights of a
    language model (GPTQ by default, calibrating on the text in CALIB)."""
    from smallify.api import quantize as quantize_verb
    from smallify.llm.load import is_llm_source
    from smallify.quant import config as qc
    from smallify.quant.mixed import MixedPrecision

    if is_llm_source(input):
        from smallify.llm import cli as llm_cli

        try:
            config = llm_cli.make_config(method, bits, _group(group_size or "auto"), sym, lm_head, samples, seq_len,
                                         tuple(skip))
            typer.echo(llm_cli.quantize_llm_command(input, out, config, calib, fmt, force, sys.stderr.isatty()))
        except SmallifyError as e:
            _fail(str(e))
        from smallify.measure import file_size, format_bytes

        typer.echo(f"wrote {out} ({format_bytes(file_size(out))}; float model {format_bytes(file_size(input))})")
        return
    try:
        if max_drop is not None or size_budget is not None:
            if method not in ("int8", "mixed"):
                raise ConfigError(f"--max-drop/--size-budget choose per-layer bits (--method mixed), not --method {method}")
            method = "mixed"
        if method not in METHODS:
            raise ConfigError(f"--method {method!r} is not supported; accepted: {', '.join(METHODS)}")
        group = _group(group_size or ("auto" if method == "weight-only" else "none"))
        static = dict(calibration=calibration, percentile=percentile, per_channel=not per_tensor,
                      activation_dtype=activation_dtype, skip=tuple(skip), max_calibration_samples=max_samples,
                      scheme=scheme, smooth_quant=_smooth(smooth_quant))
        ranges = {"auto": "auto", "on": True, "off": False}
        if reduce_range not in ranges:
            raise ConfigError(f"--reduce-range {reduce_range!r} is not supported; accepted: auto, on, off")
        if method in ("int8", "mixed"):
            static["reduce_range"] = ranges[reduce_range]
        if method in ("int8", "mixed", "fp8") and group == "auto":
            raise ConfigError("--group-size auto applies to --method weight-only; give an integer or none")
        if method == "int8":
            config = qc.Int8Static(**static, weight_bits=8 if bits is None else bits, group_size=group)
        elif method == "mixed":
            config = MixedPrecision(**static, group_size=group, max_drop=max_drop, size_budget=size_budget,
                                    candidates=(8, 4 if bits is None else bits))
        elif method == "fp8":
            if bits not in (None, 8):
                raise ConfigError(f"--bits {bits} does not apply to fp8 (8 bits); accepted: omit --bits")
            config = qc.FP8Static(**{**static, "smooth_quant": None if smooth_quant == "auto" else static["smooth_quant"]},
                                  format=fp8_format)
        elif method == "dynamic":
            if bits not in (None, 8):
                raise ConfigError(f"--bits {bits} does not apply to dynamic (int8 weights); accepted: omit --bits")
            from smallify.quant.dynamic import Int8Dynamic

            config = Int8Dynamic(per_channel=not per_tensor, skip=tuple(skip), reduce_range=ranges[reduce_range])
        elif method == "weight-only":
            config = qc.WeightOnly(bits=4 if bits is None else bits, group_size=group, skip=tuple(skip))
        else:
            config = qc.Float16(dtype=method, skip=tuple(skip))
        needs_data = method in ("int8", "mixed", "fp8")
        if needs_data and calib is None:
            raise ConfigError(f"--method {method} calibrates activations: give --calib data.npz")
        from smallify.files import check_writable

        check_writable(out, (input, calib))     # before any work: never the input, and really writable
        if needs_data:
            _note_half_calibration(calib)
        fn = load_callable(eval_fn, "--eval") if eval_fn else None
        if method == "mixed" and max_drop is not None and fn is None:
            raise ConfigError("--max-drop needs --eval package.module:function (the metric it bounds)")
        result = quantize_verb(str(input), config, str(calib) if needs_data else None, out=str(out),
                               progress=sys.stderr.isatty(), eval_fn=fn)
    except SmallifyError as e:
        _fail(str(e))
    from smallify.measure import file_size, format_bytes

    typer.echo(str(result.plan) if result.plan is not None else str(result.report))
    for warning in result.report.warnings:
        typer.echo(f"smallify: warning: {warning}", err=True)
    typer.echo(f"wrote {out} ({format_bytes(file_size(out))}; float model {format_bytes(file_size(input))})")
    if check_speed:
        try:
            from smallify.measure.isolated import speed_check

            progress = (lambda msg: typer.echo(f"  timing {msg}", err=True)) if sys.stderr.isatty() else None
            typer.echo(speed_check(input, out, result.report.round_trips, progress=progress))
        except SmallifyError as e:     # the output is written and correct; only the timing could not be made
            typer.echo(f"smallify: warning: no speed check: {e}", err=True)


def _note_half_calibration(calib: Path) -> None:
    """Half-precision calibration data is accepted (widened to the model's float type): say so on stderr."""
    from smallify.data import npz_headers

    for key, (_, dtype) in npz_headers(calib).items():
        if dtype.kind == "f" and dtype.itemsize < 4:
            typer.echo(f"smallify: note: calibration array {key!r} is {dtype}; accepted and widened to "
                       "float32 to calibrate (ranges keep float16's precision)", err=True)


@app.command()
def prune(
    model: str = typer.Option("example", "--model", help="'example' (bundled Fashion-MNIST ResNet) or "
                              "package.module:factory"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="safetensors / .smallify weights for --model"),
    out: Path = typer.Option(..., "--out", help="the pruned model (.smallify: load it with smallify.load or "
                             "as --student-weights)"),
    onnx_out: Optional[Path] = typer.Option(None, "--onnx", help="also export the pruned model to ONNX"),
    ratio: float = typer.Option(0.3, "--ratio", help="fraction of channels removed, in [0, 1)"),
    importance: str = typer.Option("l2", "--importance", help="l2 | l1 | bn_scale | taylor | activation | apoz"),
    scope: str = typer.Option("layer", "--scope", help="layer (every group) | global (ranked across groups)"),
    ignore: list[str] = typer.Option([], "--ignore", help="layer pattern whose output channels stay; repeatable"),
    round_to: int = typer.Option(1, "--round-to", help="kept channel counts are multiples of this"),
    reconstruct: bool = typer.Option(False, "--reconstruct/--no-reconstruct", metavar="",
                                     help="refit the next layers by least squares"),
    branches: int = typer.Option(0, "--branches", help="residual branches removed whole (ranked on --calib)"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz of inputs (activation criteria, "
                                         "--reconstruct; default for the example: 512 training images)"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1,3,224,224 (tracing)"),
):
    """Remove channels (structured pruning); the result is physically smaller."""
    from smallify.data import load_npz
    from smallify.pack import save
    from smallify.prune import ChannelPrune
    from smallify.prune import prune as prune_verb

    try:
        check_outputs(out, onnx_out, (weights, calib))
        config = ChannelPrune(ratio=ratio, importance=importance, scope=scope, ignore=tuple(ignore),
                              round_to=round_to, reconstruct=reconstruct, branches=branches)
        net = model_from(model, weights, "model")
        arrays = load_npz(calib) if calib is not None else None
        data = calibration_inputs(model, arrays)
        example = example_batch(model, input_shape, arrays)
        pruned = prune_verb(net, config, example, data=data, progress=sys.stderr.isatty())
        from smallify.files import write_all

        writers = {out: lambda tmp: save(pruned, tmp)}
        if onnx_out is not None:
            from smallify.export.onnx import export_onnx

            writers[onnx_out] = lambda tmp: export_onnx(pruned, tmp, example[:1])
        write_all(writers)      # both files or neither
    except SmallifyError as e:
        _fail(str(e))
    typer.echo(str(pruned.prune_report))
    typer.echo(f"wrote {out}" + (f" and {onnx_out}" if onnx_out else ""))


@app.command()
def distill(
    student: str = typer.Option(..., "--student", help="'example' or package.module:factory"),
    student_weights: Optional[Path] = typer.Option(None, "--student-weights", help="e.g. the .smallify from "
                                                   "smallify prune"),
    teacher: str = typer.Option("example", "--teacher", help="'example' or package.module:factory"),
    teacher_weights: Optional[Path] = typer.Option(None, "--teacher-weights"),
    data: Optional[Path] = typer.Option(None, "--data", help=".npz with 'x' (inputs) and optionally 'y' "
                                        "(labels); default with the example teacher: Fashion-MNIST train"),
    out: Path = typer.Option(..., "--out", help="the trained student (.smallify)"),
    epochs: float = typer.Option(1.0, "--epochs"),
    lr: float = typer.Option(2e-3, "--lr"),
    batch_size: int = typer.Option(128, "--batch-size"),
    temperature: float = typer.Option(4.0, "--temperature"),
    alpha: float = typer.Option(0.9, "--alpha", help="weight of the soft-label loss (1 - alpha on labels)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="resume file (written as it trains)"),
):
    """Train a student on a teacher's soft labels (knowledge distillation)."""
    import numpy as np
    import torch

    from smallify.data import load_npz
    from smallify.distill import KD
    from smallify.distill import distill as distill_verb
    from smallify.pack import save
    from smallify.train import TrainConfig, TrainData, is_main_process, rank_and_world

    try:
        from smallify.files import check_writable

        check_writable(out, (student_weights, teacher_weights, data, checkpoint))
        config, train_config = KD(temperature=temperature, alpha=alpha), TrainConfig(epochs=epochs, lr=lr)
        t_model = model_from(teacher, teacher_weights, "teacher")
        s_model = model_from(student, student_weights, "student")
        if data is not None:
            arrays = load_npz(data)
            if "x" not in arrays:
                raise ConfigError(f"{data} needs an array 'x' (inputs) and optionally 'y' (labels); it has {sorted(arrays)}")
            x, y = torch.from_numpy(arrays["x"]), (torch.from_numpy(arrays["y"].astype(np.int64)) if "y" in arrays else None)
            augment = None
        elif teacher == "example":
            from smallify.examples import fashion_mnist
            from smallify.examples.train_fmnist import augment

            xs, ys = fashion_mnist.load("train")
            x, y = torch.from_numpy(fashion_mnist.normalize(xs)), torch.from_numpy(ys.astype(np.int64))
        else:
            raise ConfigError("give --data train.npz (arrays 'x' and optionally 'y')")
        eval_fn, metric = _distill_metric(s_model, x, y, data, teacher)
        distill_verb(s_model, t_model, TrainData(x, y, batch_size, augment=augment), config, train_config,
                     eval_fn=eval_fn, checkpoint=checkpoint, progress=sys.stderr.isatty())
        if not is_main_process():      # under torchrun: rank 0 writes the student and reports
            return
        save(s_model, out)
    except SmallifyError as e:
        _fail(str(e))
    processes = rank_and_world()[1]
    if processes > 1:
        typer.echo(f"data-parallel: {processes} processes")
    for h in s_model.train_history:
        typer.echo(f"epoch {h['epoch']}: loss {h['loss']:.4f}" + (f"; {metric} {h['metric']:.4f}" if "metric" in h else "")
                   + f" ({h['seconds']:.0f} s)")
    if eval_fn is not None:
        typer.echo(f"teacher: {metric} {eval_fn(t_model):.4f}")
    typer.echo(f"wrote {out}")


def _distill_metric(student, x, y, data: Optional[Path], teacher: str):
    """The accuracy shown after each distillation epoch: top-1 on Fashion-MNIST's test set for the example
    teacher, else on the first 2,048 samples of --data when it has labels and the student outputs class scores
    (training data: it shows progress, not generalization); (None, None) otherwise."""
    import numpy as np
    import torch

    if data is None and teacher == "example":
        from smallify.examples import fashion_mnist

        xs, ys = fashion_mnist.load("test")
        x, y, name = torch.from_numpy(fashion_mnist.normalize(xs)), torch.from_numpy(ys.astype(np.int64)), "test top-1"
    elif y is not None:
        n = min(2048, len(x))
        x, y, name = x[:n], y[:n], f"top-1 on {n} training samples"
    else:
        return None, None
    with torch.no_grad():
        if student.eval()(x[:2]).ndim != 2:
            return None, None

    def top1(model) -> float:
        model.eval()
        with torch.no_grad():
            return float(sum((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum() for i in range(0, len(x), 500)) / len(x))
    return top1, name


@app.command()
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX models taking the same inputs; ratios are to the first"),
    threads: int = typer.Option(2, "--threads", help="intra-op threads for every model"),
    batch: list[int] = typer.Option([1, 32], "--batch", help="batch sizes to time; repeatable"),
    budget: float = typer.Option(10.0, "--budget", help="seconds of timing per batch size"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the table as JSON"),
    runtime: list[str] = typer.Option(["onnxruntime"], "--runtime",
                                      help="onnxruntime | openvino; repeat to time both side by side"),
    isolate: bool = typer.Option(True, "--isolate/--no-isolate", metavar="",
                                 help="time each model in a fresh process of its own, models alternating, 3 "
                                 "rounds; or all sessions interleaved in one process (can mislead)"),
):
    """Size on disk and latency (median, p90) of ONNX models, measured side by side."""
    from smallify.bench import bench_onnx_files, print_table, write_json
    from smallify.files import check_writable

    try:
        if json_out:
            check_writable(json_out, models)
        rows = bench_onnx_files([str(m) for m in models], batch, threads, budget, tuple(runtime), isolate=isolate,
                                progress=sys.stderr.isatty())
    except SmallifyError as e:
        _fail(str(e))
    how = "each model in its own process, 3 rounds" if isolate else "interleaved in one process"
    print_table(rows, f"{' + '.join(runtime)} CPU, {threads} thread(s), {how}; ratios to the first row")
    if json_out:
        write_json(rows, json_out)
        typer.echo(f"wrote {json_out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", help="folder for the ONNX files and results.json"),
    threads: int = typer.Option(2, "--threads"),
    data: Optional[Path] = typer.Option(None, "--data", help="folder with the Fashion-MNIST IDX files"),
):
    """Quantize the bundled Fashion-MNIST ResNet to INT8 and compare it with FP32, side by side."""
    from smallify.examples.demo import run_demo

    try:
        from smallify.files import check_writable

        if out.exists() and not out.is_dir():
            raise OutputError(f"--out {out} is a file; give a folder for the demo's files")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the folder {out} ({e.strerror or e}); give a folder you can write") from None
        check_writable(out / "results.json")
        run_demo(out, threads, data)
    except SmallifyError as e:
        _fail(str(e))


from smallify.cluster.cli import cluster as _cluster_command  # noqa: E402  (it imports this module's helpers lazily)

app.command("cluster")(_cluster_command)
from smallify.lowrank.cli import decompose as _decompose_command  # noqa: E402

app.command("decompose")(_decompose_command)
from smallify.tune.cli import compress as _compress_command, report as _report_command  # noqa: E402

app.command("compress")(_compress_command)
app.command("report")(_report_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
