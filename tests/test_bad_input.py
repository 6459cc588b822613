"""The bad-input catalogue: every way a user's file, option or interrupted job can be wrong, one case each.

Every case asserts the same contract: exit status 2 with ONE line on stderr that names the problem and
what is accepted (or the typed ``smallify`` exception on the API), no traceback, nothing left in the
output folder (no output, no temporary file), and every input file byte-for-byte as it was.
Sections: model files, calibration files, configs (options), output paths, containers, interrupted jobs.
"""
import hashlib
import json
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

import smallify as sm
from smallify import cli
from smallify.cli import app
from smallify.data import load_npz

runner = CliRunner()


# ---------------------------------------------------------------------------------------------- helpers

def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir()) if folder is not None and Path(folder).is_dir() else []


def assert_refused(args, *fragments, inputs=(), out_dir=None) -> str:
    """Run the CLI and check the contract: exit 2, one line naming the problem, no traceback, nothing
    written to ``out_dir``, every file in ``inputs`` unchanged. Returns the line."""
    hashes = {str(p): sha(p) for p in inputs}
    before = listing(out_dir)
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)     # no exception escaped
    err = r.stderr.strip()
    assert err.startswith("smallify: error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in err, err
    assert listing(out_dir) == before, f"left behind: {set(listing(out_dir)) - set(before)}"
    assert {str(p): sha(p) for p in inputs} == hashes, "an input file was changed"
    return err


def assert_quantize_refused(model, calib, out_dir, *fragments, extra=(), out_name="q.onnx", out=None):
    out = out if out is not None else Path(out_dir) / out_name
    args = ["quantize", model, "--out", out] + (["--calib", calib] if calib is not None else []) + list(extra)
    return assert_refused(args, *fragments, inputs=[p for p in (model, calib) if p is not None and Path(p).is_file()],
                   out_dir=out_dir)


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def with_weight(float_onnx, path, value):
    m = onnx.load(float_onnx)
    w = next(i for i in m.graph.initializer if i.name == "fc.weight")
    a = numpy_helper.to_array(w).copy()
    a.flat[3] = value
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    onnx.save(m, path)
    return path


# ---------------------------------------------------------------------------------------------- model files

def test_model_missing(tmp_path, out_dir, calib_npz):
    assert_quantize_refused(tmp_path / "nope.onnx", calib_npz, out_dir, "model file", "does not exist")


def test_model_is_a_folder(tmp_path, out_dir, calib_npz):
    (tmp_path / "m.onnx").mkdir()
    assert_quantize_refused(tmp_path / "m.onnx", calib_npz, out_dir, "is not a file")


def test_model_not_onnx_suffix(tmp_path, out_dir, calib_npz, float_onnx):
    p = tmp_path / "model.pt"
    p.write_bytes(float_onnx.read_bytes())
    assert_quantize_refused(p, calib_npz, out_dir, "not an ONNX file", "expected a .onnx file")


@pytest.mark.parametrize("content", ["empty", "truncated", "random"])
def test_model_corrupt(tmp_path, out_dir, calib_npz, float_onnx, content):
    data = {"empty": b"", "truncated": float_onnx.read_bytes()[:700],
            "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()}[content]
    p = tmp_path / "broken.onnx"
    p.write_bytes(data)
    assert_quantize_refused(p, calib_npz, out_dir, "broken.onnx")


def test_model_without_nodes(tmp_path, out_dir, calib_npz):
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, 1, 16, 16])
    p = tmp_path / "empty_graph.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [x], [x])), p)
    assert_quantize_refused(p, calib_npz, out_dir, "empty_graph.onnx")


def test_model_external_data_missing(tmp_path, out_dir, calib_npz, float_onnx):
    m = onnx.load(float_onnx)
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()
    assert_quantize_refused(tmp_path / "m.onnx", calib_npz, out_dir, "m.onnx is not a valid ONNX model", "m.onnx.data")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.opset_import[0].__setattr__("version", 99), "uses ONNX opset 99; this installation reads"),
    (lambda m: m.graph.node[0].__setattr__("op_type", "FancyConv"), "No Op registered for FancyConv"),
    (lambda m: m.graph.input[0].type.tensor_type.__setattr__("elem_type", onnx.TensorProto.STRING),
     "ONNX Runtime cannot load the model"),
], ids=["opset-99", "unknown-op", "string-input"])
def test_model_the_runtime_cannot_run(tmp_path, out_dir, calib_npz, float_onnx, edit, message):
    m = onnx.load(float_onnx)
    edit(m)
    onnx.save(m, tmp_path / "m.onnx")
    assert_quantize_refused(tmp_path / "m.onnx", calib_npz, out_dir, message)


NAN_METHODS = [m for m in cli.METHODS]   # every method the CLI offers (int8, weight-only, fp8, fp16, bf16, mixed, ...)


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", NAN_METHODS)
def test_model_weights_not_finite_every_method(tmp_path, out_dir, calib_npz, float_onnx, method, value):
    bad = with_weight(float_onnx, tmp_path / "bad.onnx", value)
    extra = ["--method", method] + (["--size-budget", "0.6"] if method == "mixed" else [])
    assert_quantize_refused(bad, calib_npz, out_dir, "'fc.weight' of layer 'fc' holds NaN or Inf", extra=extra)


def test_model_weights_not_finite_skipped_layer_is_kept(tmp_path, out_dir, calib_npz, float_onnx):
    """The same file is accepted when the bad layer is kept in float (the message's advice works)."""
    bad = with_weight(float_onnx, tmp_path / "bad.onnx", np.nan)
    r = runner.invoke(app, ["quantize", str(bad), "--calib", str(calib_npz), "--out", str(out_dir / "q.onnx"),
                            "--method", "fp16", "--skip", "fc"])
    assert r.exit_code == 0, r.output
    assert listing(out_dir) == ["q.onnx"]


@pytest.mark.parametrize("config", [sm.Int8Static(), sm.FP8Static(), sm.WeightOnly(bits=4, group_size=None),
                                    sm.Float16(), sm.Float16(dtype="bf16"), sm.Int8Dynamic(),
                                    sm.MixedPrecision(size_budget=0.6)], ids=lambda c: f"{c.kind}")
def test_module_weights_not_finite_every_method(config):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        net[2].weight[1, 2] = float("inf")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(sm.ModelError, match=r"weight of layer '2' \(Linear\) holds NaN or Inf; only finite"):
        sm.quantize(net, config, data=torch.randn(16, 8))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())   # the model is untouched


# ---------------------------------------------------------------------------------------------- calibration files

def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_calib_missing(tmp_path, out_dir, float_onnx):
    assert_quantize_refused(float_onnx, tmp_path / "none.npz", out_dir, "calibration file", "does not exist")


def test_calib_is_a_folder(tmp_path, out_dir, float_onnx):
    (tmp_path / "c.npz").mkdir()
    assert_quantize_refused(float_onnx, tmp_path / "c.npz", out_dir, "is not a file; give a .npz file")


@pytest.mark.parametrize("content", ["empty", "random", "truncated"])
def test_calib_not_a_zip(tmp_path, out_dir, float_onnx, calib_npz, content):
    p = tmp_path / "c.npz"
    p.write_bytes({"empty": b"", "random": os.urandom(3000), "truncated": calib_npz.read_bytes()[:5000]}[content])
    assert_quantize_refused(float_onnx, p, out_dir, "is not a readable .npz file", "numpy.savez")


def test_calib_member_is_not_an_array(tmp_path, out_dir, float_onnx):
    import zipfile

    p = tmp_path / "c.npz"
    with zipfile.ZipFile(p, "w") as z:
        import io

        buf = io.BytesIO()
        np.save(buf, np.zeros((4, 1, 16, 16), np.float32))
        z.writestr("input.npy", buf.getvalue())
        z.writestr("notes.txt", "hello")
    assert_quantize_refused(float_onnx, p, out_dir, "'notes.txt', which is not a .npy array")


def test_calib_member_with_an_empty_name(tmp_path, out_dir, float_onnx):
    """Found by fuzzing: zipfile's ZipInfo.is_dir raised IndexError on a member named ''."""
    import zipfile

    p = tmp_path / "c.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(zipfile.ZipInfo(""), b"data")
    assert_quantize_refused(float_onnx, p, out_dir, "holds '', which is not a .npy array")


def test_calib_header_numpy_cannot_tokenize(tmp_path, out_dir, float_onnx):
    """Found by fuzzing: numpy's header parser raised tokenize.TokenError on an unclosed bracket."""
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4,".ljust(117) + b"\n"     # the tuple never closes
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
    p = stored_npy_zip(tmp_path / "c.npz", "input.npy", header, [header], len(header), zlib.crc32(header))
    assert_quantize_refused(float_onnx, p, out_dir, "has no readable .npy header", "write it again with numpy.savez")


def test_calib_corrupt_bytes_fail_the_crc(tmp_path, out_dir, float_onnx, calib):
    p = npz(tmp_path / "c.npz", input=calib.numpy())
    raw = bytearray(p.read_bytes())
    raw[400] ^= 0xFF                            # inside the stored array data
    p.write_bytes(bytes(raw))
    assert_quantize_refused(float_onnx, p, out_dir, "cannot be read", "Bad CRC-32")


class Payload:
    """Unpickling this creates a file: proof that the reader executed code from the data."""
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_calib_object_array_is_not_unpickled(tmp_path, out_dir, float_onnx):
    Payload.marker = tmp_path / "pwned"
    a = np.empty(4, dtype=object)
    a[:] = [Payload() for _ in range(4)]
    p = npz(tmp_path / "c.npz", input=a)
    assert_quantize_refused(float_onnx, p, out_dir, "has dtype object", "accepted: float, integer or bool arrays")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("array,message", [
    (np.zeros((0, 1, 16, 16), np.float32), "is empty (shape (0, 1, 16, 16))"),
    (np.float32(3.0), "is empty (shape ())"),
    (np.zeros((4, 1, 0, 16), np.float32), "every axis must hold values"),
    (np.zeros((4, 1, 16, 16), np.complex64), "has dtype complex64; accepted: float, integer or bool"),
    (np.array([["a"] * 16] * 4), "has dtype <U1; accepted"),
    (np.zeros((4, 1, 16, 16), np.int64), "has dtype int64; the model input is float32"),
    (np.zeros((4, 3, 16, 16), np.float32), "has shape (4, 3, 16, 16); the model input expects ('N', 1, 16, 16)"),
], ids=["no-samples", "scalar", "zero-axis", "complex", "strings", "integers", "wrong-shape"])
def test_calib_bad_arrays(tmp_path, out_dir, float_onnx, array, message):
    assert_quantize_refused(float_onnx, npz(tmp_path / "c.npz", input=array), out_dir, message)


def test_calib_nan(tmp_path, out_dir, float_onnx, calib):
    a = calib.numpy().copy()
    a[5, 0, 3, 3] = np.inf
    assert_quantize_refused(float_onnx, npz(tmp_path / "c.npz", input=a), out_dir, "holds NaN or Inf")


def test_calib_keys_do_not_match(tmp_path, out_dir, float_onnx, calib):
    p = npz(tmp_path / "c.npz", a=calib.numpy(), b=calib.numpy())
    assert_quantize_refused(float_onnx, p, out_dir, "do not match the model inputs ['input']")


def test_calib_float16_is_accepted_and_said(tmp_path, out_dir, float_onnx, calib):
    p = npz(tmp_path / "c.npz", input=calib.numpy().astype(np.float16))
    r = runner.invoke(app, ["quantize", str(float_onnx), "--calib", str(p), "--out", str(out_dir / "q.onnx")])
    assert r.exit_code == 0, r.output
    assert "calibration array 'input' is float16; accepted and widened to float32" in r.stderr
    assert "calibrated on 64 sample(s)" in r.stdout or "64 sample" in r.stdout, r.stdout


@pytest.mark.parametrize("data,message", [
    (torch.randn(4, 3), "batch 0 ({'input_1': '(4, 3) float32'}): mat1 and mat2 shapes cannot be multiplied"),
    (torch.randn(4, 8).half(), "({'input_1': '(4, 8) float16'}): mat1 and mat2 must have the same dtype, but got "
     "Half and Float; give batches that the model's forward takes"),
    ("missing.npz", "calibration file missing.npz does not exist"),
], ids=["shape", "float16", "missing-npz"])
def test_module_calibration_the_model_cannot_run(data, message):
    """PyTorch path: batches the model's forward rejects are a DataError naming the batch (was RuntimeError)."""
    with pytest.raises(sm.DataError) as info:
        sm.quantize(nn.Sequential(nn.Linear(8, 4)), sm.Int8Static(), data, progress=False)
    assert message in str(info.value), str(info.value)


def test_module_calibration_from_an_npz_path(tmp_path):
    """The API's .npz path works on the PyTorch path too, read lazily up to max_calibration_samples."""
    p = npz(tmp_path / "c.npz", whatever=np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    q = sm.quantize(nn.Sequential(nn.Linear(8, 4)), sm.Int8Static(max_calibration_samples=12), str(p), progress=False)
    assert "calibrated on 12 sample(s)" in str(q.quant_report)


def stored_npy_zip(path, name, header: bytes, payload_chunks, size: int, crc: int, method: int = 0):
    """A .npz (zip) with one member written by hand: ``payload_chunks`` are the member's bytes as stored
    (deflated when ``method`` is 8), ``size`` and ``crc`` describe the uncompressed member."""
    name_b = name.encode()
    data = b"".join(payload_chunks)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size, len(name_b), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                          len(name_b), 0, 0, 0, 0, 0, 0)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(name_b),
                      len(local) + len(name_b) + len(data), 0)
    Path(path).write_bytes(local + name_b + data + central + name_b + end)
    return path


def npy_header(shape, descr="<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_calib_header_declares_a_huge_shape(tmp_path, out_dir, float_onnx, calib):
    """The header says 10**12 samples (4 PB); the archive holds 64 KiB: refused from the sizes, nothing read."""
    header = npy_header((10**12, 1, 16, 16))
    body = calib.numpy().tobytes()
    p = stored_npy_zip(tmp_path / "c.npz", "input.npy", header, [header, body], len(header) + len(body),
                       zlib.crc32(header + body))
    assert_quantize_refused(float_onnx, p, out_dir, "declares shape (1000000000000, 1, 16, 16)", "truncated or corrupt")


BOMB_SAMPLES = 1024 + 160 * 16384          # 2,622,464 samples of (1, 16, 16) float32 = 2.50 GiB


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A valid .npz whose 2.6 MB deflate stream expands to 2.50 GiB of zeros (CRC and sizes honest)."""
    header = npy_header((BOMB_SAMPLES, 1, 16, 16))
    first_plain = header + bytes(1 << 20)
    zeros = bytes(16 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(first_plain) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)   # after a full flush: a block that stands alone
    tail = c.flush(zlib.Z_FINISH)
    crc = zlib.crc32(first_plain)
    for _ in range(160):
        crc = zlib.crc32(zeros, crc)
    size = len(header) + BOMB_SAMPLES * 1024
    assert size < 2**32 and size == len(first_plain) + 160 * len(zeros)
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    return stored_npy_zip(path, "input.npy", header, [first] + [block] * 160 + [tail], size, crc, method=8)


def test_calib_deflate_bomb_is_refused_without_max_samples(bomb, out_dir, float_onnx):
    assert bomb.stat().st_size < 3 << 20
    assert_quantize_refused(float_onnx, bomb, out_dir, "has shape (2622464, 1, 16, 16) (2.50 GiB)",
                     "pass --max-samples N")


def test_calib_deflate_bomb_reads_only_max_samples(bomb):
    """Reading 256 samples of the 2.5 GiB stream: the peak of Python allocations (numpy's included) stays
    under 4 MiB; measured 1.3 MiB (the 256 KiB array plus the zip reader's buffers). numpy.load of the same
    file holds the whole 2.5 GiB array."""
    tracemalloc.start()
    try:
        arrays = load_npz(bomb, max_samples=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert arrays["input"].shape == (256, 1, 16, 16) and not arrays["input"].any()
    assert peak < 4 << 20, f"peak {peak / 2**20:.2f} MiB"


def test_calib_deflate_bomb_quantizes_with_max_samples(bomb, out_dir, float_onnx):
    r = runner.invoke(app, ["quantize", str(float_onnx), "--calib", str(bomb), "--out", str(out_dir / "q.onnx"),
                            "--max-samples", "64"])
    assert r.exit_code == 0, r.output
    assert listing(out_dir) == ["q.onnx"]


def test_calib_stream_shorter_than_its_header(tmp_path, out_dir, float_onnx):
    """Sizes in the zip directory agree with the header, but the deflate stream ends early."""
    header = npy_header((64, 1, 16, 16))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(header + bytes(1000)) + c.flush()
    p = stored_npy_zip(tmp_path / "c.npz", "input.npy", header, [stream], len(header) + 64 * 1024, 0, method=8)
    assert_quantize_refused(float_onnx, p, out_dir, "calibration array 'input'", "write it again with numpy.savez")


# ---------------------------------------------------------------------------------------------- configs (options)

@pytest.mark.parametrize("extra,message", [
    (["--bits", "0"], "weight_bits=0 is not supported; accepted: integers 2..8"),
    (["--bits", "-3"], "weight_bits=-3 is not supported; accepted: integers 2..8"),
    (["--method", "weight-only", "--bits", "0"], "bits=0 is not supported; accepted: integers 2..8"),
    (["--method", "mixed", "--size-budget", "0.5", "--bits", "0"], "accepted: integers 2..8"),
    (["--bits", "16"], "accepted: integers 2..8"),
    (["--method", "int2"], "--method 'int2' is not supported; accepted: int8"),
    (["--max-samples", "0"], "max_calibration_samples=0 must be >= 1"),
    (["--calibration", "kl"], "accepted: 'minmax', 'percentile'"),
    (["--fp8-format", "e3m4", "--method", "fp8"], "e3m4"),
    (["--activation-dtype", "float"], "'float'"),
    (["--scheme", "rnn"], "'rnn'"),
    (["--smooth-quant", "1.5"], "1.5"),
    (["--method", "weight-only", "--group-size", "7"], "does not divide"),
], ids=["bits0", "bits-neg", "wo-bits0", "mixed-bits0", "bits16", "method", "max-samples0", "calibration",
        "fp8-format", "act-dtype", "scheme", "smooth", "group"])
def test_config_bad_values(out_dir, float_onnx, calib_npz, extra, message):
    assert_quantize_refused(float_onnx, calib_npz, out_dir, message, extra=extra)


@pytest.mark.parametrize("make,message", [
    (lambda: sm.Int8Static(calibration="kl"), "calibration='kl' is not supported; accepted: 'minmax', 'percentile'"),
    (lambda: sm.Int8Static(weight_bits=0), "weight_bits=0 is not supported; accepted: integers 2..8"),
    (lambda: sm.WeightOnly(bits=1), "bits=1 is not supported; accepted: integers 2..8"),
    (lambda: sm.WeightOnly(group_size=1), "group_size=1 is not supported; accepted: an integer >= 2"),
    (lambda: sm.Float16(dtype="fp32"), "dtype='fp32' is not supported; accepted: 'fp16', 'bf16'"),
    (lambda: sm.FP8Static(format="e2m5"), "format='e2m5' is not supported; accepted: 'e4m3', 'e5m2'"),
    (lambda: sm.Int8Static(percentile="high"), "percentile='high' must lie in (50, 100]"),
    (lambda: sm.Int8Static(max_calibration_samples="5"), "max_calibration_samples='5' must be >= 1 or None"),
    (lambda: sm.Int8Dynamic(skip=3), "skip=3 is not supported; accepted: a layer-name pattern"),
    (lambda: sm.Float16(layers=None), "layers=None is not supported; accepted: a layer-name pattern"),
    (lambda: sm.MixedPrecision(), "MixedPrecision needs max_drop"),
    (lambda: sm.Int8Static.from_dict({"kind": "weight_only"}), "config kind 'weight_only' given to Int8Static"),
    (lambda: sm.Int8Static.from_dict({"kind": "int8_static", "schema_version": 99}), "schema_version 99 is newer"),
    (lambda: sm.quantize(nn.Linear(2, 2), "int8"), "got str"),
], ids=["calibration", "weight_bits", "bits", "group_size", "dtype", "fp8-format", "percentile-str",
        "max-samples-str", "skip-int", "layers-none", "mixed-no-target", "from-dict-kind", "from-dict-version",
        "config-str"])
def test_config_api_values(make, message):
    with pytest.raises(sm.ConfigError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_config_calibrating_method_without_data(out_dir, float_onnx):
    assert_quantize_refused(float_onnx, None, out_dir, "calibrates activations: give --calib data.npz")


# ---------------------------------------------------------------------------------------------- output paths

def copy_of(src, folder, name="model.onnx"):
    p = Path(folder) / name
    p.write_bytes(Path(src).read_bytes())
    return p


def test_out_is_the_input(out_dir, float_onnx, calib_npz):
    model = copy_of(float_onnx, out_dir)
    assert_quantize_refused(model, calib_npz, out_dir, f"output path {model} is the input file", "never overwrites",
                     out=model)


def test_out_is_the_input_by_another_spelling(out_dir, float_onnx, calib_npz, monkeypatch):
    model = copy_of(float_onnx, out_dir)
    monkeypatch.chdir(out_dir)
    assert_quantize_refused(model, calib_npz, out_dir, "is the input file", out=Path("..") / out_dir.name / "model.onnx")


def test_out_is_a_symlink_to_the_input(out_dir, float_onnx, calib_npz):
    model = copy_of(float_onnx, out_dir)
    (out_dir / "link.onnx").symlink_to(model)
    assert_quantize_refused(model, calib_npz, out_dir, "is the input file", out=out_dir / "link.onnx")


def test_out_is_a_hard_link_to_the_input(out_dir, float_onnx, calib_npz):
    model = copy_of(float_onnx, out_dir)
    os.link(model, out_dir / "hard.onnx")
    assert_quantize_refused(model, calib_npz, out_dir, "is the input file", out=out_dir / "hard.onnx")


def test_out_is_the_calibration_file(out_dir, float_onnx, calib_npz):
    calib = copy_of(calib_npz, out_dir, "c.npz")
    assert_quantize_refused(float_onnx, calib, out_dir, "is the input file", out=calib)


@pytest.mark.parametrize("folder", ["/proc", "/sys"])
def test_out_passes_os_access_but_cannot_be_written(out_dir, float_onnx, calib_npz, folder):
    """As root, os.access(folder, W_OK) is true for /proc and /sys (and read-only binds), yet no file can be
    created there: the check creates a probe file before any work starts."""
    if not Path(folder).is_dir():
        pytest.skip(f"{folder} is not here")
    err = assert_quantize_refused(float_onnx, calib_npz, None, f"cannot write {folder}/q.onnx: creating a file in "
                           f"{folder} failed", out=Path(folder) / "q.onnx")
    assert "give a path in a folder you can write" in err


def test_out_is_a_folder(out_dir, float_onnx, calib_npz):
    assert_quantize_refused(float_onnx, calib_npz, out_dir, "is a directory; give a file name", out=out_dir)


def test_out_folder_missing(out_dir, float_onnx, calib_npz):
    assert_quantize_refused(float_onnx, calib_npz, out_dir, "folder", "does not exist", out=out_dir / "no" / "q.onnx")


def test_api_refuses_out_equal_to_input(out_dir, float_onnx):
    model = copy_of(float_onnx, out_dir)
    digest = sha(model)
    with pytest.raises(sm.OutputError, match="is the input file"):
        sm.quantize(str(model), sm.Float16(), out=model)
    assert sha(model) == digest and listing(out_dir) == ["model.onnx"]


def test_prune_onnx_output_unwritable_writes_nothing(out_dir):
    """The issue's case: `smallify prune --onnx /sys/o.onnx` wrote o.smallify and then failed."""
    assert_refused(["prune", "--out", out_dir / "o.smallify", "--onnx", "/sys/o.onnx"], "cannot write /sys/o.onnx",
            out_dir=out_dir)


def test_prune_both_outputs_one_file(out_dir):
    assert_refused(["prune", "--out", out_dir / "o.smallify", "--onnx", out_dir / "o.smallify"], "name one file",
            out_dir=out_dir)


@pytest.mark.parametrize("content", [None, b"", b"\xff" * 100], ids=["missing", "empty", "junk"])
def test_prune_weights_unreadable(tmp_path, out_dir, content):
    weights = tmp_path / "w.safetensors"
    if content is not None:
        weights.write_bytes(content)
    assert_refused(["prune", "--weights", weights, "--out", out_dir / "p.smallify"],
            "does not exist" if content is None else "is not a readable safetensors file",
            inputs=[weights] if content is not None else [], out_dir=out_dir)


def test_prune_out_is_the_weights(tmp_path):
    weights = tmp_path / "w.smallify"
    sm.save(torch.nn.Linear(2, 2), weights)
    assert_refused(["prune", "--weights", weights, "--out", weights], "is the input file", inputs=[weights],
            out_dir=tmp_path)


def test_distill_out_is_the_student_weights(tmp_path):
    weights = tmp_path / "s.smallify"
    sm.save(torch.nn.Linear(2, 2), weights)
    assert_refused(["distill", "--student", "example", "--student-weights", weights, "--out", weights],
            "is the input file", inputs=[weights], out_dir=tmp_path)


@pytest.mark.parametrize("folder", ["/proc/demo", "/sys/demo"])
def test_demo_out_folder_cannot_be_made(folder):
    assert_refused(["demo", "--out", folder], f"cannot create the folder {folder}", "give a folder you can write")


def test_demo_out_is_a_file(tmp_path):
    f = tmp_path / "results"
    f.write_text("keep me")
    assert_refused(["demo", "--out", f], "is a file; give a folder", inputs=[f], out_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- containers (.smallify)

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """q4.smallify: int4 weight-only, asymmetric (packed weights, scales, zero points); sparse.smallify: a
    float model with fc1 70% zeros (stored as a mask and its nonzeros)."""
    d = tmp_path_factory.mktemp("containers")
    sm.save(sm.quantize(mlp(), sm.WeightOnly(bits=4, group_size=None, symmetric=False)), d / "q4.smallify")
    m = mlp()
    with torch.no_grad():
        m.fc1.weight[m.fc1.weight.abs() < m.fc1.weight.abs().quantile(0.7)] = 0
    sm.save(m, d / "sparse.smallify")
    return d


def read_st(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def edited(containers, tmp_path, name, edit, manifest_edit=None):
    header, data = read_st(containers / name)
    if manifest_edit is not None:
        manifest = json.loads(header["__metadata__"]["smallify"])
        manifest_edit(manifest)
        header["__metadata__"]["smallify"] = json.dumps(manifest)
    if edit is not None:
        data = edit(header, data) or data
    return write_st(tmp_path / name, header, data)


def assert_load_refused(path, model, *fragments, error=sm.ModelError):
    digest = sha(path)
    with pytest.raises(error) as info:
        sm.load(path, model)
    for f in fragments:
        assert f in str(info.value), str(info.value)
    assert len(str(info.value).splitlines()) == 1 and sha(path) == digest
    return str(info.value)


def test_container_round_trip_is_exact(containers):
    """The control: the unedited files load and compute what was saved."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    q = sm.quantize(mlp(), sm.WeightOnly(bits=4, group_size=None, symmetric=False))
    assert torch.equal(sm.load(containers / "q4.smallify", mlp())(x), q(x))
    assert (sm.load(containers / "sparse.smallify", mlp()).fc1.weight == 0).float().mean() >= 0.69


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1], ids=["empty", "8-byte-prefix", "mid-header", "half",
                                                          "last-byte"])
def test_container_truncated(containers, tmp_path, keep):
    raw = (containers / "q4.smallify").read_bytes()
    cut = raw[:int(len(raw) * keep)] if isinstance(keep, float) else raw[:keep if keep >= 0 else len(raw) + keep]
    p = tmp_path / "cut.smallify"
    p.write_bytes(cut)
    assert_load_refused(p, mlp(), "is not a .smallify (safetensors) file", "write it with smallify.save")


def test_container_header_lies_about_offsets(containers, tmp_path):
    def edit(header, data):
        k = next(k for k in header if k.endswith("weight:packed"))
        a, b = header[k]["data_offsets"]
        header[k]["data_offsets"] = [a, b + 64]
    assert_load_refused(edited(containers, tmp_path, "q4.smallify", edit), mlp(), "is not a .smallify (safetensors) file")


def test_container_header_lies_about_dtype(containers, tmp_path):
    """uint8 packed weights declared int8 (same size, so the safetensors checks pass): our check catches it."""
    def edit(header, data):
        header["fc1.weight:packed"]["dtype"] = "I8"
    assert_load_refused(edited(containers, tmp_path, "q4.smallify", edit), mlp(), "packed weight of layer 'fc1'",
                 "torch.int8", "needs 512 uint8 bytes")


def test_container_header_lies_about_shape(containers, tmp_path):
    def edit(manifest):      # small tensors travel in one blob, their shapes in the manifest's table
        manifest["small"]["fc2.weight_scale"][1] = [5, 2]      # same byte count as [10]
    assert_load_refused(edited(containers, tmp_path, "q4.smallify", None, edit), mlp(),
                        "does not fit this model or is corrupt")


def test_container_small_tensor_table_lies(containers, tmp_path):
    def edit(manifest):
        manifest["small"]["fc2.weight_scale"][2] = 10**9
    assert_load_refused(edited(containers, tmp_path, "q4.smallify", None, edit), mlp(), "'fc2.weight_scale'",
                        "runs past")


@pytest.mark.parametrize("manifest_edit,message", [
    (lambda m: m["layers"]["fc1"].update(shape=[64, 32]), "packed weight of layer 'fc1' holds 512"),
    (lambda m: m["layers"]["fc1"].update(shape=[10**9, 10**6]), "needs 500000000000000 uint8 bytes"),
    (lambda m: m["layers"]["fc1"].update(shape=[-32, 32]), "accepted: a list of 1 to 8 positive integers"),
    (lambda m: m["layers"]["fc1"]["spec"].update(bits=99), "bits=99 is not supported; accepted: integers 2..8"),
    (lambda m: m["layers"]["fc1"]["spec"].update(bits="4"), "bits='4'; accepted: an integer 2..8"),
    (lambda m: m["layers"]["fc1"]["spec"].update(fmt="int3"), "fmt='int3'; accepted: 'float', 'fp8' or 'int'"),
    (lambda m: m["layers"]["fc1"]["spec"].pop("symmetric"), "symmetric=None; accepted: true or false"),
    (lambda m: m["layers"].update(conv9=m["layers"]["fc1"]), "no layer 'conv9'"),
    (lambda m: m.update(config={"kind": "int3_magic", "schema_version": 1}), "unknown config kind 'int3_magic'"),
    (lambda m: m.update(config={"kind": "weight_only", "bits": 4, "bogus": 1}), "unknown WeightOnly field(s)"),
    (lambda m: m.update(config={"kind": "weight_only", "bits": [4]}), "the manifest's weight_only config is invalid"),
    (lambda m: m.update(config="int8"), "the manifest's config is 'int8'; accepted: null or an object"),
    (lambda m: m.update(version=99), "written by a newer smallify (container version 99)"),
    (lambda m: m.update(version="1"), "container version '1'; accepted: an integer 1..1"),
    (lambda m: m.update(format="pickle"), "without a smallify manifest"),
    (lambda m: m.update(layers=[1, 2]), "'layers' is not an object of layer records"),
    (lambda m: m.pop("config"), "stored quantized but the manifest's config (None) leaves it a Linear"),  # a KeyError
    (lambda m: m.update(removed_branches=[["add", 7]]), "accepted: a list of [residual sum name, 0 or 1] pairs"),
], ids=["shape-bigger", "shape-huge", "shape-negative", "bits-99", "bits-str", "fmt", "field-missing",
        "layer-unknown", "config-kind", "config-field", "config-type", "config-str", "version-newer",
        "version-str", "format", "layers-list", "no-config", "branches"])
def test_container_manifest_lies(containers, tmp_path, manifest_edit, message):
    assert_load_refused(edited(containers, tmp_path, "q4.smallify", None, manifest_edit), mlp(), message)


@pytest.mark.parametrize("manifest_edit,message", [
    (lambda m: m["sparse"].update({"fc1.weight": [64, 32]}), "the mask of 'fc1.weight' holds 128 torch.uint8 byte(s)"),
    (lambda m: m["sparse"].update({"fc2.weight": [10, 32]}), "lacks its mask or values"),
], ids=["shape", "not-sparse"])
def test_container_sparse_record_lies(containers, tmp_path, manifest_edit, message):
    assert_load_refused(edited(containers, tmp_path, "sparse.smallify", None, manifest_edit), mlp(), message)


def test_container_manifest_not_json(containers, tmp_path):
    header, data = read_st(containers / "q4.smallify")
    header["__metadata__"]["smallify"] = "{" * 100000        # deep nesting: not a RecursionError traceback
    assert_load_refused(write_st(tmp_path / "q4.smallify", header, data), mlp(), "manifest that is not valid JSON")


def test_container_scale_not_finite(containers, tmp_path):
    def edit(header, data):      # the scale sits in the blob of small tensors, at the manifest's offset
        small = json.loads(header["__metadata__"]["smallify"])["small"]
        a = header[":small"]["data_offsets"][0] + small["fc1.weight_scale"][2]
        return data[:a] + struct.pack("<f", float("nan")) + data[a + 4:]
    assert_load_refused(edited(containers, tmp_path, "q4.smallify", edit), mlp(), "scale of layer 'fc1'",
                 "must be finite positive floats")


def test_container_is_a_pickle_and_nothing_runs(tmp_path):
    Payload.marker = tmp_path / "pwned"
    torch.save({"fc1.weight": Payload()}, tmp_path / "evil.smallify")
    assert_load_refused(tmp_path / "evil.smallify", mlp(), "is not a .smallify (safetensors) file")
    assert not (tmp_path / "pwned").exists()


def test_container_into_another_architecture(containers):
    assert_load_refused(containers / "q4.smallify", nn.Sequential(nn.Linear(3, 3)), "no layer 'fc1'")


def test_container_model_argument_not_a_module(containers):
    with pytest.raises(sm.ConfigError, match="needs the float architecture as a torch.nn.Module; got str"):
        sm.load(containers / "q4.smallify", "MLP")


def test_container_through_the_cli(containers, tmp_path, out_dir):
    raw = (containers / "q4.smallify").read_bytes()
    (tmp_path / "cut.smallify").write_bytes(raw[:len(raw) // 2])
    assert_refused(["prune", "--weights", tmp_path / "cut.smallify", "--out", out_dir / "p.smallify"],
            "is not a .smallify (safetensors) file", inputs=[tmp_path / "cut.smallify"], out_dir=out_dir)


# ---------------------------------------------------------------------------------------------- interrupted jobs

@pytest.mark.parametrize("fault", [KeyboardInterrupt, MemoryError, OSError])
def test_interrupted_write_leaves_nothing(out_dir, float_onnx, calib_npz, monkeypatch, fault):
    """Ctrl-C (or a full disk) while the output is being written: no output, no temporary file."""
    real = onnx.save

    def half_then_fault(proto, path, *a, **k):
        Path(path).write_bytes(proto.SerializeToString()[:1000])
        raise fault("interrupted")

    monkeypatch.setattr(onnx, "save", half_then_fault)
    digest = sha(float_onnx)
    with pytest.raises(fault):
        sm.quantize(str(float_onnx), sm.Float16(), out=out_dir / "q.onnx")
    monkeypatch.setattr(onnx, "save", real)
    assert listing(out_dir) == [] and sha(float_onnx) == digest


def test_ctrl_c_during_the_work(out_dir, float_onnx, calib_npz, monkeypatch):
    """Ctrl-C while ONNX Runtime works: exit 130 (the shell convention for SIGINT), no traceback, nothing written."""
    import onnxruntime

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxruntime, "InferenceSession", interrupted)
    digest = sha(float_onnx)
    r = runner.invoke(app, ["quantize", str(float_onnx), "--calib", str(calib_npz), "--out", str(out_dir / "q.onnx")])
    assert r.exit_code == 130 and "Traceback" not in r.output, r.output
    assert listing(out_dir) == [] and sha(float_onnx) == digest


def test_interrupted_write_keeps_the_previous_output(out_dir, containers, monkeypatch):
    """A failed save over an existing file leaves the old file whole (rename happens only at the end)."""
    import safetensors.torch

    target = out_dir / "m.smallify"
    target.write_bytes((containers / "q4.smallify").read_bytes())
    digest = sha(target)

    def fault(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", fault)
    import smallify.pack.container as container

    monkeypatch.setattr(container, "save_file", fault)
    with pytest.raises(KeyboardInterrupt):
        sm.save(mlp(), target)
    assert listing(out_dir) == ["m.smallify"] and sha(target) == digest


def train_data():
    g = torch.Generator().manual_seed(0)
    return sm.TrainData(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g), 16)


@pytest.mark.parametrize("content", ["truncated", "foreign", "other-model"])
def test_resume_from_a_bad_checkpoint(tmp_path, content):
    ckpt = tmp_path / "ckpt.pt"
    sm.train(mlp(), train_data(), sm.TrainConfig(epochs=1), checkpoint=ckpt, progress=False)
    if content == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:300])
        message = "cannot be read"
    elif content == "foreign":
        torch.save({"weights": torch.zeros(3)}, ckpt)
        message = "is not a smallify training checkpoint"
    else:
        message = "was written for another model or optimizer"
    digest = sha(ckpt)
    model = mlp() if content != "other-model" else nn.Sequential(nn.Linear(32, 10))
    with pytest.raises(sm.ModelError, match=message):
        sm.train(model, train_data(), sm.TrainConfig(epochs=2), checkpoint=ckpt, progress=False)
    assert sha(ckpt) == digest

