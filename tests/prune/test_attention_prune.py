"""Attention-head and FFN-neuron pruning of a BERT-style encoder: shapes shrink, the model still runs and
exports, removing heads whose output projection is zero changes nothing, and distillation recovers."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import smallify as sm

transformers = pytest.importorskip("transformers")


def _bert(seed=0):
    from smallify.examples.minilm import SentenceEmbedder

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return SentenceEmbedder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()


def _batches(n=64, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[::4, 16:] = 0
    return [(ids[i:i + 16], mask[i:i + 16]) for i in range(0, n, 16)]


def test_heads_and_neurons_are_removed_and_model_exports(tmp_path):
    model, data = _bert(), _batches()
    p = sm.prune_attention(model, sm.AttentionPrune(head_ratio=0.5, ffn_ratio=0.5), data)
    layer = p.encoder.encoder.layer[0]
    assert layer.attention.self.query.out_features == 32 and layer.attention.output.dense.in_features == 32
    assert layer.intermediate.dense.out_features == 64 and layer.output.dense.in_features == 64
    assert p.prune_report["layers"][0] == {"layer": "encoder.encoder.layer.0", "heads": [4, 2], "ffn": [128, 64]}
    ids, mask = data[0]
    out = p(ids, mask)
    assert out.shape == (16, 64)
    sm.export_onnx(p, tmp_path / "p.onnx", (ids[:2], mask[:2]), input_names=["input_ids", "attention_mask"])
    s = ort.InferenceSession(str(tmp_path / "p.onnx"))
    onnx_out = s.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.allclose(onnx_out, out.detach().numpy(), atol=1e-4)


def test_dead_heads_go_first_and_change_nothing():
    model, data = _bert(), _batches()
    with torch.no_grad():
        for layer in model.encoder.encoder.layer:
            layer.attention.output.dense.weight[:, 16:32] = 0      # head 1 writes nothing
            layer.output.dense.weight[:, :32] = 0                   # FFN neurons 0..31 write nothing
    p = sm.prune_attention(model, sm.AttentionPrune(head_ratio=0.25, ffn_ratio=0.25), data)
    ids, mask = data[1]
    assert torch.allclose(p(ids, mask), model(ids, mask), atol=1e-5)


def test_distillation_recovers_the_embeddings():
    teacher, data = _bert(), _batches(128)
    student = sm.prune_attention(teacher, sm.AttentionPrune(head_ratio=0.5, ffn_ratio=0.5, importance="l2"))
    ids = torch.cat([b[0] for b in data])
    mask = torch.cat([b[1] for b in data])

    class Packed(torch.nn.Module):      # TrainData holds one tensor: ids and mask stacked
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x[:, 0], x[:, 1])

    @torch.no_grad()
    def err():   # embeddings of a random encoder are all alike: compare them centred
        a, b = student(ids, mask), teacher(ids, mask)
        return float(((a - b) ** 2).sum() / ((b - b.mean(0)) ** 2).sum())

    before = err()
    sm.distill(Packed(student), Packed(teacher), sm.TrainData(torch.stack([ids, mask], 1), None, batch_size=16),
               sm.KD(output_loss="mse", alpha=1.0), sm.TrainConfig(epochs=3, lr=1e-4), progress=False)
    assert err() < 0.7 * before


def test_bad_attention_prune_input():
    with pytest.raises(sm.ConfigError, match=r"head_ratio=1.0 is not supported"):
        sm.AttentionPrune(head_ratio=1.0)
    with pytest.raises(sm.ModelError, match="no BERT-style layer"):
        sm.prune_attention(torch.nn.Linear(3, 3), sm.AttentionPrune(importance="l2"))
    with pytest.raises(sm.DataError, match="needs data="):
        sm.prune_attention(_bert(), sm.AttentionPrune())
