"""Every README code block runs as written: the python blocks in order in one namespace (the first block is the
preamble that gives `model`, `calib_batches`, `example_inputs`, `x`, `y`, ... for the bundled example), and the
`smallify ...` shell lines where they are cheap enough (the rest are listed in SKIPPED with the reason).
Shell synopses (`[--option]`, `a|b`) run with the optional parts left out and every alternative in turn, and
every option they name must be one the command accepts."""
from __future__ import annotations

import os
import re
import shlex
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"

# shell lines not run here, and why (each is covered elsewhere or takes minutes)
SKIPPED = {
    "make demo": "tests/test_demo.py runs the demo",
    "make test": "this is the test suite",
    "smallify demo": "tests/test_demo.py runs the demo",
    "python -m smallify.examples.train_fmnist": "trains the bundled model for 12 epochs",
    "smallify distill --student example --student-weights": "2 epochs over 60,000 images (minutes)",
    "smallify quantize model_dir": "tests/llm/test_llm_cli.py and test_llm_cli_bad_input.py run the LLM commands on a "
                                   "tiny Llama folder and GGUF files",
    "smallify quantize model.gguf": "tests/llm/test_llm_cli_bad_input.py runs --format gguf on a GGUF",
    "python benchmarks/llm_weight_only.py": "a benchmark of about an hour (tests/llm cover each method)",
    "smallify compress": "searches of minutes; tests/tune/test_compress_cli.py runs the command on small models",
    "smallify report": "needs a search's result.json; tests/tune/test_compress_cli.py runs it",
}
SLOW = ("--reconstruct", "--branches", "--max-drop", "smallify bench")   # tens of seconds each


def blocks(kind: str) -> list[str]:
    """The README's fenced blocks: kind 'python', or 'shell' (no language given)."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    if kind == "python":
        return [body for lang, body in found if lang == "python"]
    return [body for lang, body in found if lang == "" and re.search(r"^\s*(smallify|make|python) ", body, re.M)]


def shell_commands() -> list[str]:
    """Each command of the shell blocks (continuation lines joined), with its comment removed."""
    commands = []
    for body in blocks("shell"):
        lines = body.replace("\\\n", " ").splitlines()
        for line in lines:
            if re.match(r"\s*(smallify|make|python) ", line):
                commands.append(line.split("  #")[0].strip())
            elif line.startswith(" ") and commands and line.strip().startswith("["):
                commands[-1] += " " + line.strip()          # a synopsis continued on the next line
    return commands


def expand(command: str) -> list[list[str]]:
    """A synopsis as runnable argument lists: optional parts out, one list per alternative of `a|b|c`."""
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", command))
    runs = [[]]
    for w in words:
        options = w.split("|") if "|" in w and not w.startswith("-") else [w]
        runs = [r + [o] for r in runs for o in options]
    return runs


def test_the_readme_has_what_this_test_runs():
    py = blocks("python")
    assert len(py) >= 4 and "calib_batches =" in py[0] and "example_inputs =" in py[0]
    assert any(c.startswith("smallify quantize") for c in shell_commands())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    cwd = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(cwd)


@pytest.fixture(scope="module")
def namespace(workdir):
    """The preamble run once: the names every python block and the shell lines use."""
    ns: dict = {"__name__": "readme"}
    exec(compile(blocks("python")[0], "README.md:preamble", "exec"), ns)
    assert Path("model.onnx").is_file() and Path("calib.npz").is_file()
    _user_package(workdir)
    return ns


def _user_package(d: Path) -> None:
    """`mypkg`, the user's package the README's commands name (a metric and small model factories)."""
    (d / "mypkg").mkdir(exist_ok=True)
    (d / "mypkg" / "__init__.py").write_text("")
    (d / "mypkg" / "metrics.py").write_text(textwrap.dedent("""
        import numpy as np
        import onnxruntime as ort
        from smallify.examples import fashion_mnist

        def top1(path):
            x, y = fashion_mnist.load("test")
            x = fashion_mnist.normalize(x[:200])
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            return 100.0 * float((s.run(None, {s.get_inputs()[0].name: x})[0].argmax(1) == y[:200]).mean())
    """))
    (d / "mypkg" / "nets.py").write_text(textwrap.dedent("""
        from smallify.examples.models import ResNet

        def resnet():
            return ResNet((1, 1), (8, 16), 3, 10, "small")

        def small():
            return ResNet((1, 1, 1), (8, 16, 32), 1, 10, "small")

        def big():
            return ResNet((1, 1, 1), (16, 32, 64), 1, 10, "small")
    """))
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import sys
    sys.path.insert(0, str(d))
    from mypkg import nets
    for name, factory in (("w", nets.resnet), ("big", nets.big)):
        torch.manual_seed(0)
        save_file(factory().state_dict(), str(d / f"{name}.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(d / "train.npz", x=rng.standard_normal((256, 1, 28, 28)).astype(np.float32),
             y=rng.integers(0, 10, 256))


@pytest.mark.slow
def test_python_blocks_run_as_written(namespace):
    """The python blocks after the preamble, in order, in the preamble's namespace (about a minute: QAT,
    mixed precision, pruning with reconstruction, distillation and a gradual sparsity run)."""
    for i, body in enumerate(blocks("python")[1:], 1):
        exec(compile(body, f"README.md:python block {i}", "exec"), namespace)
    sm = namespace["sm"]
    assert namespace["qmodel"].quant_report is not None
    assert sm.sparsity_of(namespace["sparse"]) == pytest.approx(0.9, abs=0.01)
    assert Path("model.smallify").stat().st_size < 0.3 * Path("model.onnx").stat().st_size


def test_the_first_python_block_runs(namespace):
    """The quick part on its own (quantize, report, export, the ONNX path), so that `-m 'not slow'` runs it."""
    ns = dict(namespace)
    exec(compile(blocks("python")[1], "README.md:python block 1", "exec"), ns)
    assert "quantized" in str(ns["qmodel"].quant_report) and Path("model.int8.onnx").is_file()


def _cli_cases():
    cases = []
    for command in shell_commands():
        reason = next((r for k, r in SKIPPED.items() if command.startswith(k)), None)
        for args in expand(command):
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            if any(s in command for s in SLOW):
                marks.append(pytest.mark.slow)
            cases.append(pytest.param(args, marks=marks, id=" ".join(args)[:80]))
    return cases


@pytest.mark.parametrize("args", _cli_cases())
def test_shell_lines_run(namespace, args):
    from smallify.cli import app

    assert args[0] == "smallify"
    result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, f"{' '.join(args)}\n{result.output}"
    out = next((args[i + 1] for i, a in enumerate(args) if a in ("--out", "--json")), None)
    if out is not None:
        assert Path(out).exists() and f"wrote {out}" in result.output


def test_synopses_name_only_options_the_commands_take():
    """Every `--option` the README shows for a `smallify` command is in that command's --help."""
    from smallify.cli import app

    runner = CliRunner()
    for command in shell_commands():
        words = command.split()
        if words[0] != "smallify":
            continue
        helptext = runner.invoke(app, [words[1], "--help"], terminal_width=200).output
        for option in re.findall(r"(--[a-z][a-z0-9-]*)", command):
            assert option in helptext, f"{command}: {option} is not an option of smallify {words[1]}"
