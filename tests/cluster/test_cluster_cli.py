"""``smallify cluster``: runs on the bundled example and on a user's factory + weights, and every kind of bad
input (one line on stderr, exit status 2, no file written)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import smallify
from smallify.cli import app
from smallify.cluster.modules import SharedTwin
from smallify.errors import ModelError, OutputError
from smallify.examples.demo import calibration_images, pretrained_fmnist_resnet
from smallify.pack.container import read_manifest

runner = CliRunner()
LAYER = "layers.0.0.conv1"      # 16 x 16 x 3 x 3: 144 weights per output channel


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args):
    return runner.invoke(app, ["cluster", *[str(a) for a in args]])


def assert_fails(result, folder, *fragments, keep=()):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("smallify: error:") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep), "an output was (half-)written"


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(calibration_images(16))


@pytest.fixture(scope="module")
def kmeans_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kmeans")
    out, onnx_out = folder / "k.smallify", folder / "k.onnx"
    r = run("--method", "kmeans", "--bits", "4", "--scope", "channel", "--skip", "stem.0", "--out", out,
            "--onnx", onnx_out, "--onnx-form", "indices")
    return r, out, onnx_out


def test_kmeans_on_the_example(kmeans_run, images):
    r, out, onnx_out = kmeans_run
    assert r.exit_code == 0, r.output
    assert "15 layer(s) share their weights (kmeans), 1 left in float" in r.stdout
    assert "float: skipped by pattern 'stem.0'" in r.stdout
    a = smallify.load(out, pretrained_fmnist_resnet())
    b = smallify.load(out, pretrained_fmnist_resnet())
    ya = logits(a, images)
    assert torch.equal(ya, logits(b, images))            # the file is the model: loaded twice, bit-equal
    shared = {n: m for n, m in a.named_modules() if isinstance(m, SharedTwin)}
    assert len(shared) == 15 and "stem.0" not in shared
    for m in shared.values():                            # at most 16 values per output channel
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert max(len(torch.unique(row)) for row in w) <= 16
    # the printed size, breakdown and ratio are the file's and the float model's, saved the same way
    size = out.stat().st_size
    parts = read_manifest(out)["bytes"]
    smallify.save(pretrained_fmnist_resnet(), out.parent / "float.smallify")
    ratio = (out.parent / "float.smallify").stat().st_size / size
    assert f"wrote {out} (" in r.stdout and f": {size:,} bytes, {ratio:.1f}x smaller than the float model" in r.stdout
    assert f"wrote {onnx_out} (" in r.stdout
    assert "bytes: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()) in r.stdout
    assert ratio > 5.0          # measured 5.8x: 4-bit indices (entropy-coded) + float32 codebooks per channel
    # the ONNX file (codebook + index table in the graph) computes the same logits
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    y = np.concatenate([session.run(None, {name: images[i:i + 1].numpy()})[0] for i in range(4)])
    np.testing.assert_allclose(y, ya[:4].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method, values", [("binary", 2), ("ternary", 3), ("power-of-two", 7)])
def test_structured_codebooks(tmp_path, images, method, values):
    out = tmp_path / "s.smallify"
    r = run("--method", method, "--skip", "fc", "--out", out)
    assert r.exit_code == 0, r.output
    assert "15 layer(s) share their weights" in r.stdout
    a = smallify.load(out, pretrained_fmnist_resnet())
    assert torch.equal(logits(a, images), logits(smallify.load(out, pretrained_fmnist_resnet()), images))
    shared = [m for m in a.modules() if isinstance(m, SharedTwin)]
    assert len(shared) == 15
    for m in shared:                                     # binary 2, ternary 3, power of two (3 bits) 7 per channel
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert max(len(torch.unique(row)) for row in w) <= values
        if method == "power-of-two":                     # every nonzero weight is +-scale * 2^-j
            ratio = torch.log2(w.abs().amax(1, keepdim=True) / torch.where(w != 0, w.abs(), w.abs().amax(1, keepdim=True)))
            assert torch.allclose(ratio, ratio.round(), atol=1e-5)


def test_hash_on_the_example(tmp_path, images):
    out = tmp_path / "h.smallify"
    r = run("--method", "hash", "--compression", "0.125", "--seed", "3", "--out", out)
    assert r.exit_code == 0, r.output
    assert "16 layer(s) hashed" in r.stdout and "fc                                       Linear     80 buckets " \
        "for 640 weights" in r.stdout
    a = smallify.load(out, pretrained_fmnist_resnet())
    assert torch.equal(logits(a, images), logits(smallify.load(out, pretrained_fmnist_resnet()), images))
    expected = smallify.cluster(pretrained_fmnist_resnet(), smallify.HashShare(compression=0.125, seed=3),
                                progress=False)
    assert torch.equal(logits(a, images), logits(expected, images))     # the seed given is the seed used
    smallify.save(pretrained_fmnist_resnet(), tmp_path / "float.smallify")
    dense = read_manifest(tmp_path / "float.smallify")["bytes"]["float"]
    assert read_manifest(out)["bytes"]["float"] < dense / 7     # 1/8 of the weights as buckets (+ biases, BN)


def test_a_user_model_with_weights(tmp_path, user_net):
    from usernet import build

    torch.manual_seed(5)
    trained = build()
    for p in trained.parameters():                       # weights that differ from the factory's
        p.data.normal_()
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "u.smallify"
    r = run("--model", user_net, "--weights", tmp_path / "w.safetensors", "--clusters", "8", "--scope", "channel",
            "--init", "kmeans++", "--out", out)
    assert r.exit_code == 0, r.output
    assert "2 layer(s) share their weights" in r.stdout
    expected = smallify.cluster(trained, smallify.KMeans(clusters=8, scope="channel", init="kmeans++"), progress=False)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(smallify.load(out, build()), x), logits(expected, x))


def test_an_input_shape_the_model_does_not_take(tmp_path, user_net):
    r = run("--model", user_net, "--clusters", "4", "--input-shape", "1,5,12,12", "--out", tmp_path / "u.smallify",
            "--onnx", tmp_path / "u.onnx")
    assert_fails(r, tmp_path, "input of shape [1, 5, 12, 12]", "--input-shape",
                 keep=["usernet.py"] + [p.name for p in tmp_path.glob("__pycache__")])


def test_both_outputs_or_neither(tmp_path, user_net, monkeypatch):
    """The .smallify is written first, then the ONNX export fails: neither file stays."""
    import smallify.export.onnx

    def fail(*args, **kwargs):
        raise OutputError("disk full (simulated)")
    monkeypatch.setattr(smallify.export.onnx, "export_onnx", fail)
    r = run("--model", user_net, "--clusters", "4", "--input-shape", "1,3,12,12", "--out", tmp_path / "u.smallify",
            "--onnx", tmp_path / "u.onnx")
    assert_fails(r, tmp_path, "disk full (simulated)",
                 keep=["usernet.py"] + [p.name for p in tmp_path.glob("__pycache__")])


@pytest.mark.parametrize("args, fragments", [
    (("--clusters", "1"), ("clusters=1", "2..256")),
    (("--clusters", "257"), ("clusters=257", "2..256")),
    (("--bits", "9"), ("bits=9",)),
    (("--clusters", "16", "--scope", "channel"), ("'stem.0'", "9 weight(s) per channel", "clusters=16")),
    (("--scope", "group", "--group-size", "7", "--skip", "stem.0"), ("group_size=7", "does not divide")),
    (("--scope", "group"), ("group_size",)),
    (("--scope", "row"), ("scope",)),
    (("--init", "random"), ("init",)),
    (("--snap", "int4"), ("--snap 'int4'", "none, int8")),
    (("--method", "hash", "--compression", "0"), ("compression=0.0", "(0, 1)")),
    (("--method", "hash", "--compression", "1"), ("compression=1.0", "(0, 1)")),
    (("--method", "hash", "--compression", "1.5"), ("compression=1.5", "(0, 1)")),
    (("--method", "pq"), ("--method 'pq'", "kmeans, binary, ternary, power-of-two, hash")),
    (("--method", "binary", "--clusters", "4"), ("--clusters does not apply to --method binary",)),
    (("--method", "kmeans", "--compression", "0.1"), ("--compression does not apply",)),
    (("--method", "power-of-two", "--bits", "1"), ("bits=1",)),
    (("--onnx-form", "packed"), ("--onnx-form 'packed'",)),
    (("--skip", "*"), ("found no Linear, Conv",)),
])
def test_bad_options(tmp_path, args, fragments):
    r = run(*args, "--out", tmp_path / "o.smallify", "--onnx", tmp_path / "o.onnx")
    assert_fails(r, tmp_path, *fragments)


def test_outputs_that_cannot_be(tmp_path, kmeans_run):
    out = tmp_path / "o.smallify"
    assert_fails(run("--out", out, "--onnx", out), tmp_path, "name one file")
    weights = tmp_path / "w.smallify"
    weights.write_bytes(kmeans_run[1].read_bytes())
    assert_fails(run("--weights", weights, "--out", weights), tmp_path, "is the input file", keep=["w.smallify"])
    assert weights.read_bytes() == kmeans_run[1].read_bytes()
    assert_fails(run("--out", tmp_path), tmp_path, "is a directory", keep=["w.smallify"])


def tamper(src, dst, edit):
    """``src`` rewritten with ``edit(manifest, tensors)`` applied (a .smallify is safetensors + a JSON manifest)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(meta["smallify"])
    edit(manifest, tensors)
    save_file(tensors, str(dst), metadata={**meta, "smallify": json.dumps(manifest)})
    return dst


def _flip(tensors, at):
    coded = tensors[f"{LAYER}.indices:coded"].clone()
    coded[at] ^= 0xFF
    tensors[f"{LAYER}.indices:coded"] = coded


TAMPERED = {
    "count": lambda m, t: m["shared"][LAYER].update(count=2300),
    "alphabet": lambda m, t: m["shared"][LAYER].update(alphabet=8),
    "codebook": lambda m, t: t.update({f"{LAYER}.codebook": t[f"{LAYER}.codebook"][:, :8].clone()}),
    "values": lambda m, t: (m["shared"][LAYER]["share"].update(k=8), m["shared"][LAYER].update(alphabet=8)),
    "stream": lambda m, t: _flip(t, 40),
    "truncated": lambda m, t: t.update({f"{LAYER}.indices:coded": t[f"{LAYER}.indices:coded"][:50].clone()}),
}


@pytest.mark.parametrize("case", [*sorted(TAMPERED), "scope"])
def test_codebook_and_indices_disagree(tmp_path, kmeans_run, case):
    edit = TAMPERED.get(case, lambda m, t: m["shared"][LAYER]["share"].update(scope="group", group_size=7))
    bad = tamper(kmeans_run[1], tmp_path / "bad.smallify", edit)
    with pytest.raises(ModelError) as e:
        smallify.load(bad, pretrained_fmnist_resnet())
    assert LAYER in str(e.value)
    assert_fails(run("--weights", bad, "--out", tmp_path / "o.smallify"), tmp_path, keep=["bad.smallify"])
