"""The transformer scheme on a tiny random BERT (built offline from a config): only MatMul/Gemm inputs are
quantized, LayerNorm/Softmax/residual adds stay float, and the embeddings stay close to float."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import smallify as sm


@pytest.fixture(scope="module")
def tiny_bert_onnx(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from smallify.examples.minilm import SentenceEmbedder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
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
    assert res.report.scheme == "transformer"
    assert len(res.report.quantized) == 12                  # 2 layers x (q, k, v, out, ffn in, ffn out)
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
