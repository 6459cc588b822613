"""Every corpus model x every method: a correct result (output SQNR/cosine against the float model above the
method's stated bound, and the integer kernels the method promises in ONNX Runtime's optimized graph), or a
typed refusal in one line. Never a traceback. The corpus: smallify/examples/onnx_corpus.py."""
import numpy as np
import onnx
import pytest

from smallify.examples import onnx_check as ocheck
from smallify.examples import onnx_corpus as oc

# Bounds per method: output SQNR in dB against the float model on 16 random inputs, and cosine. The corpus
# models have random weights and random inputs (harder than trained models on real data: no redundancy).
# int8/dynamic read 31-64 dB on every model (12-30 dB on an AVX2-only CPU before reduce_range: see
# test_saturating_cpu_reads_the_isa_flags); 4-bit weights 10-47 dB (zoo classics: 256-wide Gemm, no redundancy).
BOUNDS = {"int8": (25.0, 0.999), "w4a8": (10.0, 0.95), "weight-only": (10.0, 0.95), "dynamic": (25.0, 0.999),
          "fp8": (20.0, 0.99), "fp16": (60.0, 0.99999), "bf16": (45.0, 0.9999), "mixed": (10.0, 0.95)}
# refusals the corpus expects: (model, method) -> words the one-line reason must hold
EXPECTED_REFUSALS = {(m, "dynamic"): "for convolutions use --method int8"
                     for m in ("grouped_convs", "conv_transpose", "unet")}
SLOW_MODELS = {"bert", "gpt2", "cnn_dynamo"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    built: dict[str, oc.CorpusModel] = {}

    def get(name: str) -> oc.CorpusModel:
        if name not in built:
            built[name] = oc.build(name, folder)
        return built[name]
    return get, folder


def _cases():
    for name in oc.BUILDERS:
        for method in ocheck.METHODS:
            marks = [pytest.mark.slow] if name in SLOW_MODELS or method == "mixed" else []
            yield pytest.param(name, method, marks=marks, id=f"{name}-{method}")


@pytest.mark.parametrize("name,method", list(_cases()))
def test_corpus_model_method(corpus, name, method):
    get, folder = corpus
    model = get(name)
    before = model.path.read_bytes()
    outcome = ocheck.check(model, method, folder)
    assert model.path.read_bytes() == before                       # the user's model is never touched
    assert outcome.status != "crash", outcome.message
    if (name, method) in EXPECTED_REFUSALS:
        assert outcome.status == "refused"
        assert EXPECTED_REFUSALS[name, method] in outcome.message and "\n" not in outcome.message
        assert not (folder / f"{name}.{method}.onnx").exists()      # nothing written
        return
    assert outcome.status == "ok", outcome.message
    min_sqnr, min_cos = BOUNDS[method]
    assert outcome.sqnr >= min_sqnr and outcome.cosine >= min_cos, outcome
    if method in ("int8", "dynamic"):     # (mixed: only layers kept at 8 bits run integer kernels)
        assert outcome.integer_kernels >= 1, outcome                # QLinearConv / QGemm / MatMulInteger ...
    if method == "weight-only" and name not in ("grouped_convs", "conv_transpose", "unet"):   # (convolutions only)
        assert outcome.integer_kernels >= 1, outcome                # MatMulNBits (Gemm rewritten as MatMul)
    if method != "dynamic" and name not in ("two_inputs",):   # two_inputs: 300 weights, Q/DQ overhead dominates
        assert outcome.size_ratio < 1.0, outcome


def test_shared_initializer_gets_one_quantized_copy(corpus):
    get, folder = corpus
    model = get("shared_linear")
    ocheck.check(model, "int8", folder)
    q = onnx.load(str(folder / "shared_linear.int8.onnx"))
    names = [i.name for i in q.graph.initializer]
    assert len(names) == len(set(names))
    fc = [n for n in names if n.startswith("fc.weight")]
    assert fc == ["fc.weight:q", "fc.weight:s", "fc.weight:zp"]    # one int8 copy read by both layers
    readers = [n for n in q.graph.node if "fc.weight:q" in n.input]
    assert len(readers) == 1 and readers[0].op_type == "DequantizeLinear"


def test_old_opset_is_converted_not_renumbered(corpus):
    get, folder = corpus
    model = get("zoo_opset6")          # BatchNormalization(6): ONNX Runtime has no kernel for it
    ocheck.check(model, "int8", folder)
    q = onnx.load(str(folder / "zoo_opset6.int8.onnx"))
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert q.ir_version >= 7
    # IR 3: initializers were listed as inputs; the quantized model's only input is the image
    assert [i.name for i in q.graph.input] == ["data"]


def test_fixed_batch_model_calibrates_sample_by_sample(corpus):
    import smallify as sm

    get, folder = corpus
    model = get("fixed_batch1")
    res = sm.quantize(str(model.path), sm.Int8Static(), data=model.calib, progress=False)
    assert res.report.calibration_samples == len(model.calib["input"]) == 32


def test_cli_method_dynamic_and_refusal(corpus, tmp_path):
    from typer.testing import CliRunner

    from smallify.cli import app

    get, _ = corpus
    runner = CliRunner()
    mlp = get("matmul_add")
    out = tmp_path / "mlp.dyn.onnx"
    r = runner.invoke(app, ["quantize", str(mlp.path), "--out", str(out), "--method", "dynamic"])
    assert r.exit_code == 0, r.output
    assert ocheck.kernels(out).get("DynamicQuantizeMatMul", 0) + ocheck.kernels(out).get("MatMulIntegerToFloat", 0) == 2
    unet = get("unet")
    out = tmp_path / "unet.dyn.onnx"
    r = runner.invoke(app, ["quantize", str(unet.path), "--out", str(out), "--method", "dynamic"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Int8Dynamic found no layer" in lines[0] and "--method int8" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "mlp.dyn.onnx"]


def test_saturating_cpu_reads_the_isa_flags():
    from smallify.quant.config import resolve_reduce_range, saturating_cpu

    assert saturating_cpu("model name: AMD EPYC\nflags\t: fpu sse2 avx avx2 fma\n") is True
    assert saturating_cpu("flags\t: avx2 avx512f avx512_vnni\n") is False
    assert saturating_cpu("flags\t: avx2 avx_vnni\n") is False
    assert saturating_cpu("flags\t: avx2 amx_int8 amx_bf16\n") is False
    assert resolve_reduce_range(True) is True and resolve_reduce_range(False) is False
    import smallify as sm

    with pytest.raises(sm.ConfigError, match="reduce_range='yes'.*accepted: True"):
        sm.Int8Static(reduce_range="yes")
    assert sm.Int8Static().to_dict()["reduce_range"] in (True, False)       # resolved once, saved as done


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_5_to_7_bit_weights_are_stored_in_int8(corpus, bits):
    import smallify as sm

    get, folder = corpus
    model = get("cnn_opset17")
    out = folder / f"w{bits}.onnx"
    sm.quantize(str(model.path), sm.Int8Static(weight_bits=bits, reduce_range=False), data=model.calib, out=str(out),
                progress=False)
    q = onnx.load(str(out))
    w = [i for i in q.graph.initializer if i.name.endswith(":q") and len(i.dims) == 4]    # conv weights
    assert len(w) == 4
    for t in w:
        values = onnx.numpy_helper.to_array(t)
        assert t.data_type == onnx.TensorProto.INT8 and np.abs(values).max() == 2 ** (bits - 1) - 1
    ref = ocheck.run_onnx(model.path, {"input": model.calib["input"][:16]})
    got = ocheck.run_onnx(out, {"input": model.calib["input"][:16]})
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 15     # was 0.5-2 dB packed as int4


@pytest.mark.parametrize("method", ["int8", "dynamic", "weight-only"])
def test_large_model_path_through_external_data(corpus, tmp_path, monkeypatch, method):
    """Models over 1 GB (protobuf's 2 GB cap) travel through files with external data: the same code runs
    here on a small model with the threshold lowered to 1 byte."""
    import smallify as sm
    from smallify.onnx import io as qonnx

    get, _ = corpus
    model = get("external_data")
    monkeypatch.setattr(qonnx, "LARGE_MODEL_BYTES", 1)
    out = tmp_path / "big.q.onnx"
    sm.quantize(str(model.path), ocheck.method_config(method), data=model.calib, out=str(out), progress=False)
    assert (tmp_path / "big.q.onnx.data").stat().st_size > 0                       # weights beside the graph
    stored = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    feeds = {"input": model.calib["input"][:16]}
    ref, got = ocheck.run_onnx(model.path, feeds), ocheck.run_onnx(out, feeds)
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > BOUNDS[method][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.q.onnx", "big.q.onnx.data"]
    size = (tmp_path / "big.q.onnx.data").stat().st_size
    sm.quantize(str(model.path), ocheck.method_config(method), data=model.calib, out=str(out), progress=False)
    assert (tmp_path / "big.q.onnx.data").stat().st_size == size       # a re-run replaces the data, never appends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.q.onnx", "big.q.onnx.data"]


def test_report_lists_operators_without_integer_kernels(corpus):
    import smallify as sm

    get, _ = corpus
    for name, expected in (("mobilenet_se", {"HardSigmoid": 11}), ("cnn_opset17", {})):
        model = get(name)
        res = sm.quantize(str(model.path), sm.Int8Static(), data=model.calib, progress=False)
        assert res.report.round_trips == expected            # hard-swish's HardSigmoid: DQ -> float -> Q
    assert "HardSigmoid x11" in str(sm.quantize(str(get("mobilenet_se").path), sm.Int8Static(),
                                                data=get("mobilenet_se").calib, progress=False).report)


def test_cli_check_speed_says_whether_int8_pays(corpus, tmp_path):
    from typer.testing import CliRunner

    from smallify.cli import app

    get, _ = corpus
    model = get("cnn_opset17")
    np.savez(tmp_path / "c.npz", input=model.calib["input"])
    r = CliRunner().invoke(app, ["quantize", str(model.path), "--calib", str(tmp_path / "c.npz"), "--out",
                                 str(tmp_path / "q.onnx"), "--check-speed"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("speed check (ONNX Runtime"))
    assert "CPU:" in lines[start]
    for b, line in zip((1, 32), lines[start + 1:start + 3]):
        assert line.startswith(f"  batch {b}: ") and line.endswith("x") and "ms float" in line
    ratios = [float(ln.rsplit(" ", 1)[1][:-1]) for ln in lines[start + 1:start + 3]]
    assert any("no speed-up" in ln for ln in lines) == any(x >= 1.0 for x in ratios)


def _save(tmp_path, name, nodes, inputs, outputs, inits, opset=17):
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_integer_shape_arithmetic_is_not_quantized(tmp_path):
    """Mul/Add of two int64 shape values (h * w) stay as they are; only float Add/Mul are quantized (the int64
    Mul was placed and calibration failed with ONNX Runtime's type error)."""
    import smallify as sm
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv.weight"),
             numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.array(3, np.int64), "three")]
    nodes = [helper.make_node("Conv", ["x", "conv.weight"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Gather", ["s", "two"], ["h"]), helper.make_node("Gather", ["s", "three"], ["w"]),
             helper.make_node("Mul", ["h", "w"], ["hw"]), helper.make_node("Cast", ["hw"], ["hwf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["r", "hwf"], ["out"])]        # divided by the pixel count
    path = _save(tmp_path, "shape_mul", nodes,
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, "H", "W"])], inits)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    sm.quantize(str(path), sm.Int8Static(), data={"x": x}, out=str(tmp_path / "q.onnx"), progress=False)
    ref, got = ocheck.run_onnx(path, {"x": x}), ocheck.run_onnx(tmp_path / "q.onnx", {"x": x})
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 25


def test_smoothquant_gives_a_shared_weight_one_copy_per_activation(tmp_path):
    """One weight read by MatMuls on two activations with different channel ranges: each reader gets the weight
    smoothed for its own activation (was one copy for both: -7.2 dB)."""
    import smallify as sm
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, "fc.weight"),
             numpy_helper.from_array(np.geomspace(0.05, 20, 16).astype(np.float32), "c")]
    nodes = [helper.make_node("Mul", ["x", "c"], ["x2"]),
             helper.make_node("MatMul", ["x", "fc.weight"], ["y1"]),
             helper.make_node("MatMul", ["x2", "fc.weight"], ["y2"]),
             helper.make_node("Add", ["y1", "y2"], ["out"])]
    path = _save(tmp_path, "shared_smooth", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "A", "B"])], inits)
    x = rng.standard_normal((32, 4, 16)).astype(np.float32)
    sm.quantize(str(path), sm.Int8Static(scheme="transformer", smooth_quant=0.8), data={"x": x},
                out=str(tmp_path / "q.onnx"), progress=False)
    ref, got = ocheck.run_onnx(path, {"x": x[:16]}), ocheck.run_onnx(tmp_path / "q.onnx", {"x": x[:16]})
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 25


@pytest.mark.parametrize("method", ["int8", "dynamic"])
def test_tied_embedding_table_read_twice_and_by_the_lm_head(tmp_path, method):
    """One 2-D table read by two Gathers and by a Gemm (a tied LM head): one int8 copy for the lookups, the head
    quantized as a layer, no duplicate names (was a checker error)."""
    import smallify as sm
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    table = rng.standard_normal((1024, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["e1"], axis=0),
             helper.make_node("Gather", ["emb.weight", "ids2"], ["e2"], axis=0),
             helper.make_node("Add", ["e1", "e2"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "ln.weight", "ln.bias"], ["hn"], axis=-1),
             helper.make_node("Gemm", ["hn", "emb.weight"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(table, "emb.weight"), numpy_helper.from_array(np.ones(64, np.float32), "ln.weight"),
             numpy_helper.from_array(np.zeros(64, np.float32), "ln.bias")]
    path = _save(tmp_path, "tied", nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
                                           helper.make_tensor_value_info("ids2", TensorProto.INT64, ["N"])],
                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1024])], inits)
    feeds = {"ids": rng.integers(0, 1024, 64), "ids2": rng.integers(0, 1024, 64)}
    res = sm.quantize(str(path), ocheck.method_config(method), data=feeds if method == "int8" else None,
                      out=str(tmp_path / "q.onnx"), progress=False)
    q = onnx.load(str(tmp_path / "q.onnx"))
    names = [i.name for i in q.graph.initializer]
    assert len(names) == len(set(names)) and "emb.weight" in res.report.quantized
    assert sum(n.op_type == "Gather" and n.input[0].endswith(":q") for n in q.graph.node) == 2
    ref, got = ocheck.run_onnx(path, feeds), ocheck.run_onnx(tmp_path / "q.onnx", feeds)
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 25


def test_cli_check_speed_on_fixed_batch_and_old_opset_models(corpus, tmp_path):
    from typer.testing import CliRunner

    from smallify.cli import app

    get, _ = corpus
    for name in ("fixed_batch1", "zoo_opset6"):
        model = get(name)
        key = next(iter(model.calib))
        np.savez(tmp_path / "c.npz", **{key: model.calib[key]})
        out = tmp_path / f"{name}.q.onnx"
        r = CliRunner().invoke(app, ["quantize", str(model.path), "--calib", str(tmp_path / "c.npz"), "--out",
                                     str(out), "--check-speed"])
        assert r.exit_code == 0 and out.exists(), r.output
        if name == "fixed_batch1":      # batch 1 only: the model's batch dimension is fixed
            assert "  batch 1: " in r.output and "batch 32" not in r.output
        else:                            # ONNX Runtime cannot run the opset-6 float model: one warning line
            assert "smallify: warning: no speed check:" in r.output and "Traceback" not in r.output


def test_dynamic_ignores_nan_in_layers_it_does_not_convert(corpus, tmp_path):
    """NaN in a convolution that dynamic INT8 leaves in float is the model's business; NaN in a Gemm it converts
    is refused."""
    import smallify as sm
    from onnx import numpy_helper

    get, _ = corpus
    model = onnx.load(str(get("cnn_opset17").path))
    conv_w = next(i for i in model.graph.initializer if len(i.dims) == 4)
    bad = numpy_helper.to_array(conv_w).copy()
    bad.flat[0] = np.nan
    conv_w.CopyFrom(numpy_helper.from_array(bad, conv_w.name))
    res = sm.quantize(model, sm.Int8Dynamic(), progress=False)
    assert res.report.quantized == ["fc"]
    fc_w = next(i for i in model.graph.initializer if i.name == "fc.weight")
    worse = numpy_helper.to_array(fc_w).copy()
    worse.flat[0] = np.inf
    fc_w.CopyFrom(numpy_helper.from_array(worse, "fc.weight"))
    with pytest.raises(sm.ModelError, match="'fc.weight' of layer 'fc' holds NaN or Inf"):
        sm.quantize(model, sm.Int8Dynamic(), progress=False)


def test_cli_reduce_range_option(corpus, tmp_path):
    from typer.testing import CliRunner

    from smallify.cli import app

    get, _ = corpus
    model = get("cnn_opset17")
    np.savez(tmp_path / "c.npz", input=model.calib["input"])
    for value, top in (("on", 63), ("off", 127)):
        out = tmp_path / f"q_{value}.onnx"
        r = CliRunner().invoke(app, ["quantize", str(model.path), "--calib", str(tmp_path / "c.npz"), "--out", str(out),
                                     "--reduce-range", value])
        assert r.exit_code == 0, r.output
        q = onnx.load(str(out))
        w = [onnx.numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith(":q") and len(i.dims) == 4]
        assert max(int(np.abs(v).max()) for v in w) == top
    r = CliRunner().invoke(app, ["quantize", str(model.path), "--calib", str(tmp_path / "c.npz"), "--out",
                                 str(tmp_path / "x.onnx"), "--reduce-range", "maybe"])
    assert r.exit_code == 2 and "accepted: auto, on, off" in r.output and not (tmp_path / "x.onnx").exists()
