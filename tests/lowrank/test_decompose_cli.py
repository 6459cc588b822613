"""``smallify decompose``: the bundled example and a user's factory + weights give files that load back to the
model the verb makes in-process (and ONNX that computes the same), the speed check prints its timings, and every
kind of bad input is one line on stderr, exit status 2, nothing written."""
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import smallify
from smallify.cli import app
from smallify.examples.demo import calibration_images, pretrained_fmnist_resnet
from smallify.lowrank import Decomposed, LowRank, decompose
from smallify.measure.macs import count_macs

runner = CliRunner()
USER_NET = (                    # a user's model with a grouped conv, which no method decomposes
    "import torch\n"
    "def build():\n"
    "    torch.manual_seed(0)\n"
    "    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),\n"
    "        torch.nn.Conv2d(32, 32, 3, padding=1, groups=4), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3),\n"
    "        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 24))\n")


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args):
    return runner.invoke(app, ["decompose", *[str(a) for a in args]])


def assert_fails(result, folder, *fragments, keep=()):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("smallify: error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in err, err
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep), "an output was (half-)written"


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(calibration_images(64, seed=1))


@pytest.fixture(scope="module")
def calib64(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input=images.numpy())
    return path


@pytest.fixture
def user_net(tmp_path, monkeypatch):
    (tmp_path / "lowrank_usernet.py").write_text(USER_NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "lowrank_usernet:build"


def user_files(folder):
    return ["lowrank_usernet.py"] + [p.name for p in folder.glob("__pycache__")]


def test_spatial_on_the_example_with_its_own_images(tmp_path, images):
    """Default data: the example's 512 calibration images; the file and the ONNX are the in-process model."""
    out, onnx_out = tmp_path / "s.smallify", tmp_path / "s.onnx"
    r = run("--method", "spatial", "--macs", "0.6", "--runtime", "none", "--out", out, "--onnx", onnx_out)
    assert r.exit_code == 0, r.output
    expected = decompose(pretrained_fmnist_resnet(), LowRank(method="spatial", macs=0.6, runtime=None),
                         data=torch.from_numpy(calibration_images(512)), progress=False)
    assert str(expected.report).splitlines()[1:] == r.stdout.splitlines()[1:17]     # the same layers, ranks, errors
    loaded = smallify.load(out, pretrained_fmnist_resnet())
    parts = {n: m for n, m in loaded.named_modules() if isinstance(m, Decomposed)}
    assert sorted(parts) == sorted(expected.report.decomposed) and len(parts) == 11
    assert {m.method for m in parts.values()} == {"spatial"}
    y = logits(loaded, images)
    np.testing.assert_allclose(y.numpy(), logits(expected, images).numpy(), atol=1e-5, rtol=0)
    original = pretrained_fmnist_resnet()
    assert count_macs(loaded, images[:1]) <= 0.6 * count_macs(original, images[:1])
    # measured: 63/64 same top-1 as the original (no fine-tuning), relative logit error 0.0996
    assert (y.argmax(1) == logits(original, images).argmax(1)).float().mean() >= 0.9
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    onnx_y = np.concatenate([session.run(None, {name: images[i:i + 1].numpy()})[0] for i in range(4)])
    np.testing.assert_allclose(onnx_y, y[:4].numpy(), atol=1e-4, rtol=1e-4)
    assert f"wrote {out} (" in r.stdout and f"wrote {onnx_out} (" in r.stdout


@pytest.mark.parametrize("method, args, config", [
    ("tucker", ("--macs", "0.6"), dict(macs=0.6)),
    ("svd", ("--rank", "8"), dict(rank=8)),      # svd: only the two 1x1 convs and fc (--macs 0.6: a bad input)
])
def test_example_with_calibration_data(tmp_path, calib64, images, method, args, config):
    out = tmp_path / "m.smallify"
    r = run("--method", method, *args, "--runtime", "none", "--calib", calib64, "--out", out)
    assert r.exit_code == 0, r.output
    expected = decompose(pretrained_fmnist_resnet(), LowRank(method=method, runtime=None, **config), data=images,
                         progress=False)
    loaded = smallify.load(out, pretrained_fmnist_resnet())
    parts = {n: m for n, m in loaded.named_modules() if isinstance(m, Decomposed)}
    assert sorted(parts) == sorted(expected.report.decomposed) and parts
    assert {m.method for m in parts.values()} == {method}
    for name, m in parts.items():
        assert list(m.ranks) == next(l.ranks for l in expected.report.layers if l.name == name)
    np.testing.assert_allclose(logits(loaded, images).numpy(), logits(expected, images).numpy(), atol=1e-5, rtol=0)
    if method == "tucker":     # fc is not a k x k conv: listed as kept with the reason, not an error
        assert re.search(r"^  fc +Linear  kept: tucker decomposes k x k convolutions", r.stdout, re.M)
    else:
        assert sorted(parts) == ["fc", "layers.1.0.downsample.0", "layers.2.0.downsample.0"]


def test_a_user_model_with_weights(tmp_path, user_net):
    """A factory + safetensors weights; the grouped conv (not named) is only listed in the report."""
    from lowrank_usernet import build

    trained = build()
    torch.manual_seed(5)
    for p in trained.parameters():
        p.data.normal_(0, 0.2)
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.randn(16, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "x.npz", x=x.numpy())
    out = tmp_path / "u.smallify"
    r = run("--model", user_net, "--weights", tmp_path / "w.safetensors", "--calib", tmp_path / "x.npz", "--rank", "0.5",
            "--round-to", "4", "--runtime", "none", "--out", out)
    assert r.exit_code == 0, r.output
    assert re.search(r"^  3 +Conv2d  kept: grouped convolution \(groups=4\)$", r.stdout, re.M), r.stdout
    expected = decompose(trained, LowRank(rank=0.5, round_to=4, runtime=None), data=x, progress=False)
    assert expected.report.decomposed == ["0", "5", "9"]
    loaded = smallify.load(out, build())
    np.testing.assert_allclose(logits(loaded, x).numpy(), logits(expected, x).numpy(), atol=1e-5, rtol=0)


def test_the_speed_check_prints_its_timings(tmp_path, calib64, monkeypatch):
    monkeypatch.setenv("SMALLIFY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "t.smallify"
    r = run("--method", "svd", "--rank", "8", "--runtime", "onnxruntime", "--threads", "1", "--calib", calib64,
            "--out", out)
    assert r.exit_code == 0, r.output
    rows = {m[0]: (float(m[1]), float(m[2]), "kept: svd ranks [8] not faster" in line)
            for line in r.stdout.splitlines()
            for m in re.findall(r"^  (\S+) .*, (\d+\.\d{3}) -> (\d+\.\d{3}) ms", line)}
    assert sorted(rows) == ["fc", "layers.1.0.downsample.0", "layers.2.0.downsample.0"], r.stdout
    for before, after, kept in rows.values():       # replaced only where it got faster (3 decimals printed:
        assert before > 0 and after > 0               # equal-looking times go either way)
        assert kept if after > before else not kept if after < before else True
    assert (tmp_path / "cache" / "lowrank_speed.json").is_file()
    loaded = smallify.load(out, pretrained_fmnist_resnet())
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, Decomposed)) == \
        sorted(n for n, (_, _, kept) in rows.items() if not kept)


@pytest.mark.parametrize("args, fragments", [
    (("--rank", "0"), ("rank=0", "an integer >= 1")),
    (("--rank", "-3"), ("rank=-3", "an integer >= 1")),
    (("--rank", "1.0"), ("rank=1.0", "a fraction in (0, 1)")),
    (("--rank", "1.5"), ("rank=1.5", "a fraction in (0, 1)")),
    (("--rank", "big"), ("rank='big'", "'vbmf'")),
    (("--method", "svd", "--rank", "vbmf"), ("rank='vbmf'", "method 'tucker' or 'auto'")),
    (("--method", "svd", "--rank", "16", "--layers", "layers.1.0.downsample.0"),
     ("'layers.1.0.downsample.0'", "rank 16 >= the full rank 16 of svd")),
    (("--method", "svd", "--rank", "10", "--layers", "fc"), ("'fc'", "rank 10 >= the full rank 10")),
    (("--energy", "0"), ("energy=0.0", "(0, 1]")),
    (("--energy", "1.5"), ("energy=1.5", "(0, 1]")),
    (("--macs", "0"), ("macs=0.0", "(0, 1)")),
    (("--macs", "1"), ("macs=1.0", "(0, 1)")),
    (("--params", "1.2"), ("params=1.2", "(0, 1)")),
    (("--params", "-0.5"), ("params=-0.5", "(0, 1)")),
    (("--method", "svd", "--macs", "0.6"), ("macs=0.6 cannot be met", "accepted: macs >= 0.996")),
    (("--method", "svd", "--macs", "0.01"), ("macs=0.01 cannot be met",)),
    (("--method", "tucker", "--layers", "fc"), ("layer 'fc' (Linear) cannot be decomposed", "k x k")),
    (("--layers", "layers.9.*"), ("pattern 'layers.9.*' matches no Linear or Conv2d layer",)),
    (("--rank", "8", "--energy", "0.9"), ("give one of --rank, --energy, --macs, --params; got --rank, --energy",)),
    (("--macs", "0.5", "--params", "0.5"), ("got --macs, --params",)),
    (("--method", "cp"), ("--method 'cp'", "auto, svd, spatial, tucker, separable")),
    (("--runtime", "tensorrt"), ("--runtime 'tensorrt'", "onnxruntime, openvino, none")),
    (("--round-to", "0"), ("round_to=0", "an integer >= 1")),
    (("--skip", "*"), ("found no layer to decompose",)),
])
def test_bad_options(tmp_path, calib64, args, fragments):
    timing = () if "--runtime" in args else ("--runtime", "none")
    r = run(*args, *timing, "--calib", calib64, "--out", tmp_path / "o.smallify", "--onnx", tmp_path / "o.onnx")
    assert_fails(r, tmp_path, *fragments)


def test_bad_files(tmp_path):
    out = tmp_path / "o.smallify"
    assert_fails(run("--weights", tmp_path / "missing.safetensors", "--out", out), tmp_path,
                 "missing.safetensors does not exist")
    assert_fails(run("--weights", tmp_path / "missing.smallify", "--out", out), tmp_path, "missing.smallify",
                 "no such file")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    assert_fails(run("--calib", tmp_path / "bad.npz", "--runtime", "none", "--out", out), tmp_path, "bad.npz",
                 keep=["bad.npz"])
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 3, 28, 28), np.float32))    # the example takes 1 channel
    assert_fails(run("--calib", tmp_path / "shape.npz", "--runtime", "none", "--out", out), tmp_path,
                 "input of shape [1, 3, 28, 28]", keep=["bad.npz", "shape.npz"])
    assert_fails(run("--out", out, "--onnx", out), tmp_path, "name one file", keep=["bad.npz", "shape.npz"])
    assert_fails(run("--out", tmp_path), tmp_path, "is a directory", keep=["bad.npz", "shape.npz"])


def test_bad_input_on_a_user_model(tmp_path, user_net):
    out = tmp_path / "u.smallify"
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 3, 10, 10)).astype(np.float32))
    calib = ("--calib", tmp_path / "x.npz")
    keep = user_files(tmp_path) + ["x.npz"]
    assert_fails(run("--model", user_net, "--layers", "3", "--runtime", "none", *calib, "--out", out), tmp_path,
                 "layer '3' (Conv2d) cannot be decomposed: grouped convolution (groups=4)", keep=keep)
    assert_fails(run("--model", user_net, "--out", out), tmp_path, "--runtime onnxruntime needs --calib", "--runtime none",
                 keep=keep)
    assert_fails(run("--model", user_net, "--runtime", "none", "--macs", "0.5", "--out", out), tmp_path, "--macs needs --calib",
                 "--params instead", keep=keep)
    assert_fails(run("--model", user_net, "--runtime", "none", "--out", out, "--onnx", tmp_path / "u.onnx", "--input-shape",
                     "1,5,10,10"), tmp_path, "input of shape [1, 5, 10, 10]", keep=keep)
    assert_fails(run("--model", user_net, "--runtime", "none", "--out", out, "--onnx", tmp_path / "u.onnx"), tmp_path,
                 "give --input-shape", keep=keep)
