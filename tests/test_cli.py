"""The command line: success paths and every kind of bad input (one line on stderr, non-zero exit, no output)."""
import subprocess
import sys

import numpy as np
import pytest
import onnx
from typer.testing import CliRunner

from smallify.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_fails(result, *fragments):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("smallify: error:") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


def test_quantize_success(float_onnx, calib_npz, tmp_path):
    out = tmp_path / "q.onnx"
    r = run("quantize", float_onnx, "--calib", calib_npz, "--out", out, "--skip", "fc")
    assert r.exit_code == 0, r.output
    assert "6 layer(s) quantized, 1 left in float" in r.stdout and "float: fc (skipped by pattern 'fc')" in r.stdout
    onnx.checker.check_model(onnx.load(out))


def test_single_array_may_have_any_key(float_onnx, calib, tmp_path):
    npz = tmp_path / "c.npz"
    np.savez(npz, whatever=calib.numpy())
    r = run("quantize", float_onnx, "--calib", npz, "--out", tmp_path / "q.onnx", "--per-tensor")
    assert r.exit_code == 0, r.output


def test_missing_model(tmp_path, calib_npz):
    r = run("quantize", tmp_path / "nope.onnx", "--calib", calib_npz, "--out", tmp_path / "q.onnx")
    assert_fails(r, "does not exist")
    assert not (tmp_path / "q.onnx").exists()


def test_not_an_onnx_file(tmp_path, calib_npz):
    p = tmp_path / "model.pt"
    p.write_bytes(b"\x80\x04junk")
    assert_fails(run("quantize", p, "--calib", calib_npz, "--out", tmp_path / "q.onnx"), "not an ONNX file")


def test_corrupt_onnx(tmp_path, calib_npz, float_onnx):
    p = tmp_path / "broken.onnx"
    p.write_bytes(float_onnx.read_bytes()[:500])
    r = run("quantize", p, "--calib", calib_npz, "--out", tmp_path / "q.onnx")
    assert_fails(r, "not a valid ONNX model")
    assert not (tmp_path / "q.onnx").exists()


def test_calib_keys_do_not_match(float_onnx, calib, tmp_path):
    npz = tmp_path / "c.npz"
    np.savez(npz, a=calib.numpy(), b=calib.numpy())
    assert_fails(run("quantize", float_onnx, "--calib", npz, "--out", tmp_path / "q.onnx"),
                 "do not match the model inputs ['input']")


def test_calib_shape_does_not_match(float_onnx, tmp_path):
    npz = tmp_path / "c.npz"
    np.savez(npz, input=np.zeros((4, 3, 16, 16), np.float32))
    r = run("quantize", float_onnx, "--calib", npz, "--out", tmp_path / "q.onnx")
    assert_fails(r, "has shape (4, 3, 16, 16)", "expects ('N', 1, 16, 16)")
    assert not (tmp_path / "q.onnx").exists()


def test_empty_calibration(float_onnx, tmp_path):
    npz = tmp_path / "c.npz"
    np.savez(npz, input=np.zeros((0, 1, 16, 16), np.float32))
    assert_fails(run("quantize", float_onnx, "--calib", npz, "--out", tmp_path / "q.onnx"), "is empty")


def test_missing_calibration_file(float_onnx, tmp_path):
    assert_fails(run("quantize", float_onnx, "--calib", tmp_path / "none.npz", "--out", tmp_path / "q.onnx"),
                 "does not exist")


def test_nan_in_calibration(float_onnx, calib, tmp_path):
    bad = calib.numpy().copy()
    bad[3, 0, 0, 0] = np.nan
    npz = tmp_path / "c.npz"
    np.savez(npz, input=bad)
    r = run("quantize", float_onnx, "--calib", npz, "--out", tmp_path / "q.onnx")
    assert_fails(r, "NaN or Inf")
    assert not (tmp_path / "q.onnx").exists()


def test_nan_in_weights(float_onnx, calib_npz, tmp_path):
    m = onnx.load(float_onnx)
    w = next(i for i in m.graph.initializer if i.name.endswith("conv1.weight"))
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] = np.inf
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    bad = tmp_path / "nan.onnx"
    onnx.save(m, bad)
    assert_fails(run("quantize", bad, "--calib", calib_npz, "--out", tmp_path / "q.onnx"), "NaN or Inf")
    assert not (tmp_path / "q.onnx").exists()


def test_unwritable_output(float_onnx, calib_npz, tmp_path):
    assert_fails(run("quantize", float_onnx, "--calib", calib_npz, "--out", tmp_path / "no" / "dir" / "q.onnx"),
                 "does not exist")
    assert_fails(run("quantize", float_onnx, "--calib", calib_npz, "--out", tmp_path), "is a directory")


def test_bad_option_value(float_onnx, calib_npz, tmp_path):
    assert_fails(run("quantize", float_onnx, "--calib", calib_npz, "--out", tmp_path / "q.onnx",
                     "--calibration", "kl"), "accepted: 'minmax', 'percentile'")


def test_bad_smooth_quant(float_onnx, calib_npz, tmp_path):
    assert_fails(run("quantize", float_onnx, "--calib", calib_npz, "--out", tmp_path / "q.onnx",
                     "--smooth-quant", "strong"), "migration strength")
    r = run("quantize", float_onnx, "--calib", calib_npz, "--out", tmp_path / "q.onnx", "--smooth-quant", "0.5")
    assert r.exit_code == 0 and "scheme: cnn;" in r.stdout, r.output   # no MatMul with weights: nothing smoothed


def test_unsupported_layers_are_listed_and_the_rest_quantized(tmp_path):
    import torch

    import smallify as sm
    from tests.quant.test_ptq import WithUnsupported

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    sm.export_onnx(WithUnsupported().eval(), path, torch.randn(1, 1, 8, 8))
    npz = tmp_path / "c.npz"
    np.savez(npz, input=np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    r = run("quantize", path, "--calib", npz, "--out", tmp_path / "q.onnx")
    assert r.exit_code == 0, r.output
    assert "2 layer(s) quantized, 1 left in float" in r.stdout
    assert "ConvTranspose has no INT8 implementation" in r.stdout


def test_bench(float_onnx, tmp_path):
    r = run("bench", float_onnx, float_onnx, "--budget", "0.2", "--batch", "1", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert "b1 median ms" in r.stdout and (tmp_path / "b.json").exists()


def test_bench_both_runtimes(float_onnx, tmp_path):
    r = run("bench", float_onnx, "--budget", "0.2", "--batch", "2", "--runtime", "onnxruntime", "--runtime", "openvino")
    assert r.exit_code == 0, r.output
    assert "float.onnx [onnxruntime]" in r.stdout and "float.onnx [openvino]" in r.stdout


def test_bench_unknown_runtime(float_onnx):
    assert_fails(run("bench", float_onnx, "--runtime", "tensorrt"), "accepted: onnxruntime, openvino")


def test_bench_missing_file(tmp_path):
    assert_fails(run("bench", tmp_path / "x.onnx"), "does not exist")


def test_real_entry_point_exit_status(tmp_path):
    """The installed console script: exit status and stderr, as a shell sees them."""
    exe = [sys.executable, "-m", "smallify.cli"]
    p = subprocess.run(exe + ["quantize", str(tmp_path / "x.onnx"), "--calib", "c.npz", "--out", str(tmp_path / "o.onnx")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("smallify: error:") and p.stdout == ""



def _eval_module(tmp_path, monkeypatch, body: str) -> str:
    name = f"eval_{tmp_path.name.replace('-', '_').replace('[', '_').replace(']', '_')}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    return f"{name}:metric"


def test_cli_methods_write_their_formats(tmp_path, float_onnx, calib_npz):
    for method, extra, dtype in [("weight-only", ["--bits", "4", "--group-size", "none"], onnx.TensorProto.INT4),
                                 ("fp8", ["--calib", calib_npz], onnx.TensorProto.FLOAT8E4M3FN),
                                 ("bf16", [], onnx.TensorProto.BFLOAT16),
                                 ("int8", ["--calib", calib_npz, "--bits", "4"], onnx.TensorProto.INT4)]:
        out = tmp_path / f"{method}.onnx"
        r = run("quantize", float_onnx, "--method", method, "--out", out, *extra)
        assert r.exit_code == 0, r.output
        assert dtype in {i.data_type for i in onnx.load(out).graph.initializer}, method


def test_cli_max_drop_with_eval_hook(tmp_path, monkeypatch, float_onnx, calib_npz, calib):
    np.save(tmp_path / "x.npy", calib.numpy())
    hook = _eval_module(tmp_path, monkeypatch, (
        "import numpy as np, onnxruntime as ort\n"
        f"X = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"REF = ort.InferenceSession({str(float_onnx)!r}).run(None, {{'input': X}})[0]\n"
        "def metric(path):\n"
        "    y = ort.InferenceSession(path).run(None, {'input': X})[0]\n"
        "    return float(-100 * np.mean((y - REF) ** 2))\n"))
    out = tmp_path / "mixed.onnx"
    r = run("quantize", float_onnx, "--calib", calib_npz, "--out", out, "--max-drop", "0.05", "--eval", hook)
    assert r.exit_code == 0, r.output
    assert "mixed precision: metric" in r.stdout and "int4" in r.stdout and out.exists()


@pytest.mark.parametrize("args,message", [
    (["--method", "int3"], "accepted: int8, dynamic, fp8, weight-only"),
    (["--bits", "9"], "accepted: integers 2..8"),
    (["--method", "weight-only", "--group-size", "7"], "does not divide"),
    (["--method", "weight-only", "--group-size", "big"], "accepted: an integer >= 2, auto, none"),
    (["--max-drop", "0.3"], "needs --eval"),
    (["--max-drop", "0.3", "--eval", "nowhere_mod:f"], "cannot load --eval"),
    (["--method", "fp8", "--bits", "4"], "does not apply to fp8"),
])
def test_cli_bad_quantize_options(tmp_path, float_onnx, calib_npz, args, message):
    out = tmp_path / "o.onnx"
    assert_fails(run("quantize", float_onnx, "--calib", calib_npz, "--out", out, *args), message)
    assert not out.exists()


@pytest.mark.parametrize("body,message", [
    ("def metric(path):\n    raise RuntimeError('boom')\n", "eval_fn raised RuntimeError: boom"),
    ("def metric(path):\n    return 'high'\n", "must return a number"),
])
def test_cli_eval_hook_failures_are_reported(tmp_path, monkeypatch, float_onnx, calib_npz, body, message):
    hook = _eval_module(tmp_path, monkeypatch, body)
    out = tmp_path / "o.onnx"
    assert_fails(run("quantize", float_onnx, "--calib", calib_npz, "--out", out, "--max-drop", "0.3", "--eval", hook),
                 message)
    assert not out.exists()


def test_prune_then_distill_the_example(tmp_path):
    import torch

    import smallify as sm
    from smallify.examples.demo import calibration_images
    from smallify.examples.models import fmnist_resnet

    pruned = tmp_path / "pruned.smallify"
    r = run("prune", "--ratio", "0.3", "--reconstruct", "--out", pruned, "--onnx", tmp_path / "pruned.onnx")
    assert r.exit_code == 0, r.output
    assert "(0.4" in r.stdout and "MACs" in r.stdout and (tmp_path / "pruned.onnx").exists()
    small = sm.load(pruned, fmnist_resnet())
    assert small.get_submodule("stem.0").out_channels == 11
    x = calibration_images(256, seed=3)
    np.savez(tmp_path / "train.npz", x=x, y=np.zeros(len(x), np.int64))
    student = tmp_path / "student.smallify"
    r = run("distill", "--student", "example", "--student-weights", pruned, "--data", tmp_path / "train.npz",
            "--epochs", "0.25", "--out", student)
    assert r.exit_code == 0, r.output
    trained = sm.load(student, fmnist_resnet())
    assert trained(torch.from_numpy(x[:4])).shape == (4, 10)
    assert not torch.equal(trained.stem[0].weight, small.stem[0].weight)


def test_prune_a_user_model_by_import_path(tmp_path, user_net):
    import importlib

    from safetensors.torch import save_file

    build = getattr(importlib.import_module("usernet"), "build")
    save_file(build().state_dict(), tmp_path / "w.safetensors")
    r = run("prune", "--model", user_net, "--weights", tmp_path / "w.safetensors", "--ratio", "0.5",
            "--input-shape", "1,3,8,8", "--out", tmp_path / "p.smallify")
    assert r.exit_code == 0, r.output
    assert "16 -> 8 channels" in r.stdout


def test_prune_removes_branches_and_loads_back(tmp_path):
    import torch

    import smallify as sm
    from smallify.examples.demo import calibration_images
    from smallify.examples.models import fmnist_resnet

    out = tmp_path / "p.smallify"
    r = run("prune", "--ratio", "0.0", "--branches", "2", "--out", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("removed branch") == 2
    small = sm.load(out, fmnist_resnet())
    assert sum(1 for n in small.graph.nodes if n.op == "call_module" and n.target.endswith("conv2")) == 4
    x = torch.from_numpy(calibration_images(8, seed=5))
    assert small(x).shape == (8, 10)


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.2"], r"ratio=1.2 is not supported"),
    (["--model", "nowhere:f", "--input-shape", "1,3,8,8"], "cannot load --model"),
    (["--importance", "random"], "accepted: l2, l1, bn_scale"),
])
def test_prune_bad_input(tmp_path, args, message):
    out = tmp_path / "p.smallify"
    assert_fails(run("prune", "--out", out, *args), message)
    assert not out.exists()


def test_distill_shape_mismatch(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text("import torch\ndef three():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                                      "torch.nn.Linear(784, 3))\n")
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 1, 28, 28), np.float32))
    out = tmp_path / "s.smallify"
    assert_fails(run("distill", "--student", "tiny:three", "--data", tmp_path / "d.npz", "--out", out),
                 "outputs differ in shape")
    assert not out.exists()
