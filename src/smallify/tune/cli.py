"""``smallify compress`` (the search, or one recipe replayed) and ``smallify report`` (the HTML page of a
result.json). Exit status: 0 done, 2 bad input, 3 no candidate met the bound (the closest written as
closest.*), 4 the time budget cannot pay for one candidate. Registered on ``smallify.cli.app``."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from smallify.errors import ConfigError, SmallifyError

EXIT_BOUND, EXIT_BUDGET = 3, 4


def _model_and_data(model: str, weights: Optional[Path], calib: Optional[Path]):
    """(model, calibration data, example name): an .onnx path, 'example' or package.module:factory."""
    from smallify.cli_inputs import calibration_inputs, model_from
    from smallify.data import load_npz

    arrays = load_npz(calib) if calib is not None else None
    if model.endswith(".onnx"):
        if not Path(model).is_file():
            raise ConfigError(f"model {model} does not exist; accepted: an .onnx file, 'example' or "
                              "package.module:factory")
        if arrays is None:
            raise ConfigError("an ONNX model needs --calib data.npz (one array per model input)")
        return model, arrays
    net = model_from(model, weights, "model")
    if arrays is not None and len(arrays) > 1:
        import torch

        return net, tuple(torch.from_numpy(a) for a in arrays.values())
    data = calibration_inputs(model, arrays)
    if data is None:
        raise ConfigError(f"--calib data.npz is needed for {model} (inputs the model takes, samples on axis 0)")
    return net, data


def _train_data(model: str, train: Optional[Path], finetune: int):
    if finetune == 0:
        return None
    if train is not None:
        import smallify as sm
        from smallify.data import load_npz

        arrays = load_npz(train)
        if "x" not in arrays:
            raise ConfigError(f"--train {train} must hold an array 'x' (inputs) and optionally 'y' (labels); "
                              f"it holds {', '.join(arrays)}")
        return sm.TrainData(arrays["x"], arrays.get("y"), batch_size=128)
    if model == "example":
        from smallify.examples.compress_example import train_data

        return train_data()
    return None


def _command_line(ctx: typer.Context) -> str:
    """The command that reproduces this run: every option given a value other than its default (sys.argv is
    another program's when the command runs inside one, e.g. a test)."""
    words = ["smallify", ctx.info_name or "compress"]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value == p.default or value is None or (p.multiple and list(value) == list(p.default or [])):
            continue
        if not p.opts[0].startswith("-"):
            words.append(str(value))
        elif isinstance(value, bool):
            words.append(p.opts[0] if value else (p.secondary_opts or [p.opts[0]])[0])
        else:
            for v in (value if p.multiple else [value]):
                words += [p.opts[0], str(v)]
    return " ".join(shlex.quote(w) for w in words)


def compress(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="an .onnx file, 'example' (the bundled Fashion-MNIST ResNet) or "
                                "package.module:factory"),
    out: Path = typer.Option(..., "--out", help="folder for the candidates, best.onnx, best.smallify, recipe.json, "
                             "result.json and report.html"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz of model inputs (samples on axis 0)"),
    eval_fn: Optional[str] = typer.Option(None, "--eval", help="package.module:function(onnx_path) -> metric, "
                                          "higher is better (the example: top-1 %% on 5,000 held-out training images)"),
    max_drop: float = typer.Option(0.5, "--max-drop", help="largest metric drop allowed, in the metric's units"),
    lower_is_better: bool = typer.Option(False, "--lower-is-better", help="the metric is a loss or an error"),
    objective: str = typer.Option("latency", "--objective", help="latency | size"),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="onnxruntime | openvino: where latency is timed"),
    batch: list[int] = typer.Option([1, 32], "--batch", help="batch sizes timed; repeatable"),
    threads: int = typer.Option(2, "--threads"),
    timing: float = typer.Option(1.0, "--timing", help="seconds of timing per model, batch size and round"),
    budget: Optional[float] = typer.Option(None, "--budget", help="minutes the search may take"),
    workers: int = typer.Option(1, "--workers", help="worker processes building candidates"),
    families: str = typer.Option("quantize,prune,decompose,cluster", "--families", help="comma-separated"),
    finetune: int = typer.Option(4, "--finetune", help="at most this many candidates fine-tuned (0: none)"),
    epochs: float = typer.Option(1.0, "--epochs", help="distillation epochs per fine-tuned candidate"),
    train: Optional[Path] = typer.Option(None, "--train", help=".npz with 'x' (and 'y') for distillation "
                                         "(the example: 55,000 training images)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="safetensors / .smallify weights for MODEL"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="replay this recipe.json (or a result.json's "
                                          "chosen recipe) instead of searching"),
    ray: Optional[str] = typer.Option(None, "--ray", help="Ray cluster address: build candidates there"),
):
    """Search quantization, pruning, low-rank and k-means combinations for the fastest (or smallest) model whose
    metric drops by at most --max-drop, timed on --runtime; writes the best files and an HTML report."""
    from smallify.cli import _fail
    from smallify.cli_inputs import load_callable
    from smallify.tune import Goal, compress as compress_verb, replay
    from smallify.tune.search import BudgetError

    command = _command_line(ctx)
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder")
        if eval_fn is not None:
            metric = load_callable(eval_fn, "--eval")
        elif model == "example":
            from smallify.examples.compress_example import heldout_top1 as metric
        elif recipe is None:
            raise ConfigError("--eval package.module:function is needed: the metric compress keeps within --max-drop")
        else:
            metric = None
        net, data = _model_and_data(model, weights, calib)
        train_data = _train_data(model, train, finetune)
        if recipe is not None:
            record = replay(net, recipe, data, train_data, metric, out, progress=sys.stderr.isatty())
            typer.echo(f"replayed {record['name']}: wrote {out / 'model.onnx'}"
                       + (f"; metric {record['metric']:.4f}" if record["metric"] is not None else ""))
            return
        goal = Goal(max_drop=max_drop, metric=metric, higher_is_better=not lower_is_better, objective=objective,
                    runtime=runtime, batch=tuple(batch), threads=threads, budget_minutes=budget, workers=workers,
                    families=tuple(f.strip() for f in families.split(",") if f.strip()), finetune=finetune,
                    epochs=epochs, timing_seconds=timing)
        result = compress_verb(net, goal, data, train_data, out, progress=sys.stderr.isatty(), command=command,
                               ray_address=ray)
    except BudgetError as e:
        _fail(str(e), EXIT_BUDGET)
    except SmallifyError as e:
        _fail(str(e))
    typer.echo(str(result))
    typer.echo(f"wrote {out / 'result.json'} and {out / 'report.html'}")
    if not result.bound_met:
        raise typer.Exit(EXIT_BOUND)


def report(
    result: Path = typer.Argument(..., help="result.json written by smallify compress"),
    out: Optional[Path] = typer.Option(None, "--out", help="the HTML file (default: report.html beside RESULT)"),
):
    """Rebuild the self-contained HTML report of a compress result."""
    from smallify.cli import _fail
    from smallify.html.report import load_result, write_report

    try:
        doc = load_result(result)
        path = write_report(doc, out or result.with_name("report.html"))
    except SmallifyError as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")
