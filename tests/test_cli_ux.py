"""The command line as a new user meets it: outputs all or none, progress and "wrote" lines on long steps,
boolean flags in their --x/--no-x form, messages that say what happened (data-free, unmatched --skip,
groups that did not shrink), and `smallify bench` in separate processes."""
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from smallify.cli import app

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture
def tiny_net(user_net):
    """A user's model by import path (fast to prune)."""
    return ["--model", user_net, "--input-shape", "1,3,8,8"]


def test_prune_writes_both_outputs_or_neither(tmp_path, tiny_net, monkeypatch):
    out, onnx_out = tmp_path / "o.smallify", tmp_path / "o.onnx"
    # an output that cannot be written: refused before the work, nothing written, one line, no traceback
    r = run("prune", *tiny_net, "--ratio", "0.5", "--out", out, "--onnx", "/sys/o.onnx")
    assert r.exit_code == 2 and r.stderr.startswith("smallify: error: cannot write /sys/o.onnx")
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    # the second output fails while it is written: the first one is not left behind either
    import smallify.export.onnx as export
    from smallify.errors import ModelError

    def broken(*a, **k):
        raise ModelError("export failed on purpose")
    monkeypatch.setattr(export, "export_onnx", broken)
    r = run("prune", *tiny_net, "--ratio", "0.5", "--out", out, "--onnx", onnx_out)
    assert r.exit_code == 2 and "export failed on purpose" in r.stderr
    assert not out.exists() and not onnx_out.exists() and not list(tmp_path.glob(".*"))    # no temp files


def test_write_all_is_all_or_none(tmp_path):
    from smallify.files import write_all

    def fail(tmp):
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_all({tmp_path / "a.bin": lambda t: open(t, "wb").write(b"a"), tmp_path / "b.bin": fail})
    assert os.listdir(tmp_path) == []
    write_all({tmp_path / "a.bin": lambda t: open(t, "wb").write(b"a"), tmp_path / "b.bin": lambda t: open(t, "wb").write(b"b")})
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"] and (tmp_path / "b.bin").read_bytes() == b"b"


def test_boolean_flags_take_no_value():
    helptext = run("prune", "--help", terminal_width=200).output
    line = next(l for l in helptext.splitlines() if "--reconstruct" in l)
    assert "--no-reconstruct" in line and "<bool>" not in line
    line = next(l for l in run("quantize", "--help", terminal_width=200).output.splitlines() if "--per-tensor" in l)
    assert "--per-channel" in line and "<bool>" not in line


@pytest.fixture
def tiny_onnx(tmp_path, tiny_net):
    import smallify as sm
    import usernet

    sm.export_onnx(usernet.build().eval(), tmp_path / "tiny.onnx", torch.randn(1, 3, 8, 8))
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    return tmp_path / "tiny.onnx"


def test_data_free_methods_say_so_and_unmatched_skip_warns(tmp_path, tiny_onnx):
    r = run("quantize", tiny_onnx, "--method", "fp16", "--skip", "nothing*", "--out", tmp_path / "h.onnx")
    assert r.exit_code == 0, r.output
    assert "no calibration (data-free)" in r.stdout and "calibrated on 0" not in r.stdout
    warning = "skip pattern 'nothing*' matches no layer; the layers are named like"
    assert f"smallify: warning: {warning}" in r.stderr and f"warning: {warning}" in r.stdout
    r = run("quantize", tiny_onnx, "--calib", tmp_path / "calib.npz", "--skip", "3", "--skip", "nothing*",
            "--out", tmp_path / "q.onnx")
    assert r.exit_code == 0 and "float: 3 (skipped by pattern '3')" in r.stdout
    assert r.stderr.count("warning") == 1 and "skip pattern 'nothing*' matches no layer" in r.stderr
    r = run("quantize", tiny_onnx, "--calib", tmp_path / "calib.npz", "--out", tmp_path / "q.onnx")
    assert r.exit_code == 0 and "calibrated on 16 sample(s)" in r.stdout and "warning" not in r.stderr


def test_pruning_report_counts_only_groups_that_shrank(tmp_path, tiny_net):
    r = run("prune", *tiny_net, "--ratio", "0", "--out", tmp_path / "p.smallify")
    assert r.exit_code == 0, r.output
    assert "0 group(s) pruned, 1 prunable but unchanged" in r.stdout and "unchanged: 0 (16 channels)" in r.stdout
    assert "16 -> 16" not in r.stdout
    r = run("prune", *tiny_net, "--ratio", "0.5", "--out", tmp_path / "p.smallify")
    assert "1 group(s) pruned\n" in r.stdout and "0: 16 -> 8 channels" in r.stdout


def test_bench_isolated_by_default_has_a_row_per_model_and_batch(tmp_path, tiny_onnx):
    import shutil

    other = tmp_path / "tiny_copy.onnx"
    shutil.copy(tiny_onnx, other)
    r = run("bench", tiny_onnx, other, "--budget", "0.3", "--batch", "1", "--batch", "2", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert "each model in its own process, 3 rounds" in r.stdout and f"wrote {tmp_path / 'b.json'}" in r.stdout
    assert "CPU: " in r.stdout and "AVX-512 VNNI" in r.stdout
    doc = json.loads((tmp_path / "b.json").read_text())
    assert [row["name"] for row in doc["rows"]] == ["tiny.onnx", "tiny_copy.onnx"]
    for row in doc["rows"]:
        assert sorted(row["latency_ms"]) == ["1", "2"]
        assert all(v["median"] > 0 and v["p90"] >= v["median"] * 0.999 for v in row["latency_ms"].values())
    assert set(doc["cpu"]["isa"]) == {"AMX", "AVX-512 VNNI", "AVX-512 BF16"}
    r = run("bench", tiny_onnx, tiny_onnx, "--no-isolate", "--budget", "0.2", "--batch", "1")
    assert r.exit_code == 0 and "interleaved in one process" in r.stdout
    assert "tiny.onnx #2" in r.stdout                       # the same file twice: two rows


def test_bench_refuses_an_unwritable_json_before_timing(tiny_onnx):
    r = run("bench", tiny_onnx, "--json", "/sys/b.json")
    assert r.exit_code == 2 and r.stderr.startswith("smallify: error: cannot write /sys/b.json")


def test_narrow_tables_keep_model_names_whole():
    from rich.console import Console

    from smallify.bench import Row, print_table

    rows = [Row(name, 1000, {1: {"median": 1.0, "p90": 2.0}}) for name in
            ("resnet18.float32.baseline.onnx", "resnet18.float32.pruned.onnx")]
    console = Console(width=60, record=True)
    print_table(rows, "t", console)
    cells = [line.split("│")[1].strip() for line in console.export_text().splitlines() if line.startswith("│")]
    text = "".join(cells)
    assert "resnet18.float32.baseline.onnx" in text and "resnet18.float32.pruned.onnx" in text
    assert "…" not in console.export_text()


def test_distill_reports_accuracy_each_epoch(tmp_path, monkeypatch):
    (tmp_path / "kdnets.py").write_text(
        "import torch\n"
        "def big():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))\n"
        "def small():\n"
        "    torch.manual_seed(1)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=x.reshape(96, 16)[:, :3].argmax(1))
    r = run("distill", "--student", "kdnets:small", "--teacher", "kdnets:big", "--data", tmp_path / "d.npz",
            "--epochs", "2", "--batch-size", "32", "--out", tmp_path / "s.smallify")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    epochs = [l for l in lines if l.startswith("epoch ")]
    assert len(epochs) == 2 and all("; top-1 on 96 training samples 0." in l for l in epochs), epochs
    assert any(l.startswith("teacher: top-1 on 96 training samples 0.") for l in lines)
    assert lines[-1] == f"wrote {tmp_path / 's.smallify'}"


def test_progress_bars_show_time_remaining_on_stderr(monkeypatch):
    from rich.progress import TimeRemainingColumn

    import smallify.progress as progress

    seen = []
    real = progress.Progress

    def recording(*columns, **kwargs):
        seen.extend(type(c) for c in columns)
        seen.append(kwargs["console"].stderr)
        return real(*columns, **kwargs)
    monkeypatch.setattr(progress, "Progress", recording)
    assert list(progress.track(range(3), "x", True)) == [0, 1, 2]
    assert TimeRemainingColumn in seen and seen[-1] is True


def test_pruning_with_reconstruction_shows_progress(monkeypatch):
    import sys

    import smallify as sm

    channel = sys.modules["smallify.prune.channel"]
    steps = []
    real = channel.track

    def recording(items, description, enabled=True, total=None):
        items = list(items)
        steps.append((description, enabled, len(items)))
        return real(items, description, enabled, total)
    monkeypatch.setattr(channel, "track", recording)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(32, 3, 10, 10)
    sm.prune(net, sm.ChannelPrune(ratio=0.5, reconstruct=True), x[:2], data=x, progress=True)
    assert ("capturing layer inputs", True, 1) in steps and ("least-squares reconstruction", True, 2) in steps
    from smallify.examples.models import ResNet

    monkeypatch.setattr(sys.modules["smallify.prune.branches"], "track", recording)
    x = torch.randn(16, 1, 28, 28)
    sm.prune(ResNet((2, 2), (8, 16), 1, 10, "small"), sm.ChannelPrune(ratio=0.0, branches=1), x[:2], data=x,
             progress=True)
    assert ("ranking residual branches", True, 4) in steps
