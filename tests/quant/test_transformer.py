"""The transformer scheme on a tiny random BERT (built offline from a config): only MatMul/Gemm inputs are
quantized, LayerNorm/Softmax/residual adds stay float, and the embeddings stay close to float."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import smallify as sm


@pytest.fixture(scope="module")
def tiny_bert_onnx(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from smallify.examples.minilm import SentenceEmbedder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    model = SentenceEmbedder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, (96, 32)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::3, 20:] = 0
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    sm.export_onnx(model, path, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
                   input_names=["input_ids", "attention_mask"])
    return path, model, {"input_ids": ids, "attention_mask": mask}


def test_auto_scheme_picks_transformer_and_stays_close(tiny_bert_onnx, tmp_path):
    path, model, data = tiny_bert_onnx
    calib = {k: v[:64] for k, v in data.items()}
    test = {k: v[64:] for k, v in data.items()}
    res = sm.quantize(str(path), sm.Int8Static(), calib, out=tmp_path / "q.onnx", progress=False)
    assert res.report.scheme == "transformer" and res.report.smooth_quant == 0.8     # the defaults, said aloud
    assert str(res.report).startswith("scheme: transformer + SmoothQuant alpha 0.8;")
    assert len(res.report.quantized) == 12 + 1              # 2 layers x (q, k, v, out, ffn in, ffn out) + word table
    assert [l.op for l in res.report.layers if "embedding" in l.reason] == ["Gather"]
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("LayerNormalization") >= 4 and "Softmax" in ops
    # every quantized activation feeds only MatMul / Gemm: adds, LayerNorm, Softmax and GELU see float
    g = res.model.graph
    consumers = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n.op_type)
    dq_of_q = [d.output[0] for q in g.node if q.op_type == "QuantizeLinear"
               for d in g.node if d.op_type == "DequantizeLinear" and d.input[0] == q.output[0]]
    assert dq_of_q and all(set(consumers[t]) <= {"MatMul", "Gemm"} for t in dq_of_q)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, test)[0]
    with torch.no_grad():
        want = model(*(torch.from_numpy(test[k]) for k in ("input_ids", "attention_mask"))).numpy()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.mean() > 0.995, cos.mean()


def test_smoothing_is_exact_in_float(tiny_bert_onnx):
    from smallify.onnx.prepare import preprocess
    from smallify.onnx.smooth import smooth_onnx

    path, _, data = tiny_bert_onnx
    model = preprocess(onnx.load(path))
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)[0]
    assert smooth_onnx(model, data, sm.Int8Static(), 0.8, progress=False) == 8   # per layer: qkv input, out, ffn in/out
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)[0]
    assert np.abs(after - before).max() < 1e-5


def test_smooth_quant_validation():
    with pytest.raises(sm.ConfigError, match="migration strength"):
        sm.Int8Static(smooth_quant=1.5)
    assert sm.Int8Static(smooth_quant=None).smooth_quant is None
