"""``smallify compress`` / ``smallify report`` from the command line: a user's factory and an ONNX file searched,
the result replayed from recipe.json, and the exit codes: 3 bound not met (closest written), 4 budget too small,
2 bad input (one line, nothing written)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import smallify as sm
from smallify.cli import app

import tiny_compress as tiny

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--batch", "8", "--timing", "0.2", "--finetune", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    x = np.random.default_rng(0).standard_normal((48, 3, 12, 12)).astype(np.float32)
    np.savez(folder / "calib.npz", input=x)
    model = tiny.cnn()
    tiny.write_reference(model, x[:32], folder / "ref.npz")
    sm.export_onnx(model, folder / "tiny.onnx", torch.from_numpy(x[:2]))
    mp = pytest.MonkeyPatch()
    mp.setenv("TINY_COMPRESS_REF", str(folder / "ref.npz"))
    mp.setenv("SMALLIFY_CACHE_DIR", str(folder / "cache"))
    yield folder
    mp.undo()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def fails(result, code, *fragments):
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("smallify: error:") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


def outputs(path, x):
    return ort.InferenceSession(str(path)).run(None, {"input": x})[0]


def test_factory_search_report_and_replay(files):
    out = files / "run"
    r = run("compress", "tiny_compress:cnn", "--calib", files / "calib.npz", "--eval", "tiny_compress:cosine",
            "--max-drop", "1", "--families", "quantize", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "result.json").read_text())
    assert doc["bound_met"] and doc["verdict"] in r.stdout
    assert doc["command"] == (f"smallify compress tiny_compress:cnn --out {out} --calib {files / 'calib.npz'} --eval "
                              "tiny_compress:cosine --max-drop 1.0 --batch 8 --timing 0.2 --families quantize "
                              "--finetune 0")
    assert {s["verb"] for c in doc["candidates"] for s in c["recipe"]["steps"]} == {"quantize"}
    r = run("report", out / "result.json", "--out", files / "again.html")
    assert r.exit_code == 0, r.output
    assert doc["verdict"].split(":")[0] in (files / "again.html").read_text()
    r = run("compress", "tiny_compress:cnn", "--calib", files / "calib.npz", "--recipe", out / "recipe.json",
            "--out", files / "replayed")
    assert r.exit_code == 0, r.output
    x = np.load(files / "calib.npz")["input"][:8]
    np.testing.assert_array_equal(outputs(out / "best.onnx", x), outputs(files / "replayed" / "model.onnx", x))


def test_onnx_model(files):
    out = files / "onnx"
    r = run("compress", files / "tiny.onnx", "--calib", files / "calib.npz", "--eval", "tiny_compress:cosine",
            "--max-drop", "1", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "result.json").read_text())
    kinds = {c["recipe"]["steps"][0]["config"]["kind"] for c in doc["candidates"]}
    assert "int8_dynamic" in kinds and "int8_static" in kinds and (out / "best.onnx").exists()


def test_bound_not_met_exits_3_with_the_closest(files):
    out = files / "strict"
    r = run("compress", "tiny_compress:cnn", "--calib", files / "calib.npz", "--eval", "tiny_compress:strict",
            "--max-drop", "0", "--families", "quantize", "--out", out, *FAST)
    assert r.exit_code == 3, r.output
    assert "bound not met; closest candidate:" in r.stdout
    assert (out / "closest.onnx").exists() and (out / "closest.recipe.json").exists()
    assert not (out / "best.onnx").exists()


def test_budget_too_small_exits_4(files):
    r = run("compress", "tiny_compress:cnn", "--calib", files / "calib.npz", "--eval", "tiny_compress:cosine",
            "--budget", "0.001", "--out", files / "budget", *FAST)
    fails(r, 4, "too small for one candidate")
    assert not (files / "budget").exists()


def _recipe(files, name, doc):
    path = files / name
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("case", ["raises", "nan-metric", "unknown-step", "newer", "no-eval", "objective",
                                  "missing-onnx", "not-json"])
def test_bad_input_exits_2_and_writes_nothing(files, case):
    out = files / f"bad-{case}"
    calib = ["--calib", files / "calib.npz"]
    good = {"kind": "smallify-recipe", "schema_version": 1, "steps": []}
    args, expect = {
        "raises": (["tiny_compress:cnn", *calib, "--eval", "tiny_compress:raises"],
                   "eval_fn raised RuntimeError: the evaluation set is missing"),
        "nan-metric": (["tiny_compress:cnn", *calib, "--eval", "tiny_compress:not_a_number"],
                       "it must return a number"),
        "unknown-step": (["tiny_compress:cnn", *calib, "--recipe",
                          _recipe(files, "u.json", {**good, "steps": [{"verb": "sharpen", "config": {}}]})],
                         "unknown step 'sharpen'; accepted: prune, decompose, cluster, distill, quantize"),
        "newer": (["tiny_compress:cnn", *calib, "--recipe",
                   _recipe(files, "n.json", {**good, "schema_version": 9, "smallify_version": "9.0"})],
                  "schema_version 9, written by smallify 9.0; this smallify reads schema_version <= 1"),
        "no-eval": (["tiny_compress:cnn", *calib], "--eval package.module:function is needed"),
        "objective": (["tiny_compress:cnn", *calib, "--eval", "tiny_compress:cosine", "--objective", "speed"],
                      "objective='speed' is not supported; accepted: 'latency', 'size'"),
        "missing-onnx": ([files / "nope.onnx", *calib, "--eval", "tiny_compress:cosine"], "does not exist"),
        "not-json": (["tiny_compress:cnn", *calib, "--recipe", files / "calib.npz"], "is not readable JSON"),
    }[case]
    r = run("compress", *args, "--out", out, *FAST)
    fails(r, 2, expect)
    assert not out.exists()
