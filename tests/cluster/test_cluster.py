"""smallify.cluster: shared layers, centroid fine-tuning, the container round trip and the ONNX forms."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import smallify as sm
from smallify.cluster.modules import SharedTwin, rows_shape
from smallify.errors import ConfigError, ModelError


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


X = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
CONFIGS = [sm.KMeans(clusters=8), sm.KMeans(bits=2, scope="channel"), sm.KMeans(clusters=2, scope="group", group_size=4),
           sm.KMeans(clusters=16, scope="channel", snap="int8"), sm.Binary(), sm.Ternary(), sm.PowerOfTwo(bits=3)]


def distinct_per_row(m: SharedTwin) -> int:
    r, n = m.rows
    w = m.weight.detach().reshape(r, n)
    return max(len(torch.unique(row)) for row in w)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_each_scope_holds_at_most_k_values_and_the_file_round_trips_bit_exact(config, tmp_path):
    net = small_net()
    c = sm.cluster(net, config, data=X, progress=False)
    shared = [m for m in c.modules() if isinstance(m, SharedTwin)]
    assert len(shared) == 4 and not any(isinstance(m, nn.BatchNorm2d) for m in c.modules())   # BN folded first
    for m in shared:
        assert distinct_per_row(m) <= config.k
    path = sm.save(c, tmp_path / "c.smallify")
    back = sm.load(path, small_net())
    with torch.no_grad():
        assert torch.equal(back(X), c(X))
    for (n1, t1), (n2, t2) in zip(sorted(c.state_dict().items()), sorted(back.state_dict().items())):
        assert n1 == n2 and torch.equal(t1, t2)
    assert type(back.cluster_config) is type(config)


def test_kmeans_keeps_the_output_close_and_sqnr_grows_with_k():
    net = small_net()
    with torch.no_grad():
        ref = net(X)
    sqnr = []
    for k in (4, 16, 64):
        c = sm.cluster(net, sm.KMeans(clusters=k), progress=False)
        sqnr.append(min(l.sqnr_db for l in c.report.layers))
        with torch.no_grad():
            err = (c(X) - ref).pow(2).mean() / ref.pow(2).mean()
        assert float(err) < {4: 0.2, 16: 0.02, 64: 0.002}[k]
    assert sqnr[0] < sqnr[1] < sqnr[2] and sqnr[1] > 20      # 16 levels per layer: > 20 dB on every layer


def test_centroid_gradient_is_the_sum_over_its_members_and_indices_stay():
    lin = nn.Linear(12, 6)
    net = sm.cluster(nn.Sequential(lin), sm.KMeans(clusters=4, scope="channel"), progress=False)
    m = net[0]
    x = torch.randn(5, 12)
    loss = (net(x) ** 2).sum()
    loss.backward()
    w = m.weight.detach().requires_grad_(True)
    (torch.nn.functional.linear(x, w, m.bias.detach()) ** 2).sum().backward()
    expected = torch.zeros(6, 4).scatter_add_(1, m.indices.long(), w.grad)
    assert torch.allclose(m.codebook.grad, expected, rtol=1e-5, atol=1e-6)
    before = m.indices.clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    assert torch.equal(m.indices, before) and distinct_per_row(m) <= 4
    assert set(dict(net.named_parameters())) == {"0.codebook", "0.bias"}


def test_pruned_zeros_stay_zero_through_clustering_training_and_the_file(tmp_path):
    net = sm.finalize(sm.sparsify(small_net(), sm.Unstructured(sparsity=0.6, scope="layer")))
    zeros = {n: (m.weight == 0) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    c = sm.cluster(net, sm.KMeans(clusters=8), progress=False)
    opt = torch.optim.SGD(c.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        c(X).pow(2).mean().backward()
        opt.step()
    for name, m in c.named_modules():
        if isinstance(m, SharedTwin):
            assert m.mask is not None and torch.equal(m.weight == 0, zeros[name] | (m.weight == 0))
            assert bool((m.weight[zeros[name]] == 0).all())
    path = sm.save(c, tmp_path / "p.smallify")
    back = sm.load(path, small_net())
    with torch.no_grad():
        assert torch.equal(back(X), c(X))


def test_the_file_is_smaller_than_float_and_reports_its_bytes(tmp_path):
    net = small_net()
    float_bytes = sm.save(net, tmp_path / "f.smallify").stat().st_size
    c = sm.cluster(net, sm.KMeans(bits=2), progress=False)
    path = sm.save(c, tmp_path / "c.smallify")
    from smallify.pack.container import read_manifest

    parts = read_manifest(path)["bytes"]
    weights = sum(m.weight.numel() for m in c.modules() if isinstance(m, SharedTwin))
    assert parts["indices"] <= weights * 2 / 8 + 64 * 4      # at most 2 bits per index (+ coder headers)
    assert path.stat().st_size < float_bytes / 3


def test_weighted_kmeans_lowers_the_output_error_where_inputs_differ_in_scale():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    x = torch.randn(512, 64) * torch.logspace(-2, 1, 64)     # input channels of very different power
    ref = lin(x).detach()
    errs = {}
    for weighted in (False, True):
        c = sm.cluster(nn.Sequential(lin), sm.KMeans(clusters=4, scope="channel", weighted=weighted), data=x,
                       progress=False)
        errs[weighted] = float((c(x).detach() - ref).pow(2).mean())
    assert errs[True] < 0.75 * errs[False]        # measured: 0.092 against 0.150


def test_snap_int8_codebook_survives_int8_quantization_exactly(tmp_path):
    net = small_net()
    c = sm.cluster(net, sm.KMeans(clusters=16, scope="channel", snap="int8"), progress=False)
    for m in c.modules():
        if isinstance(m, SharedTwin):
            q = torch.round(m.codebook.detach() / m.codebook_scale)
            assert torch.equal(q * m.codebook_scale, m.codebook.detach()) and float(q.abs().max()) <= 127
    from smallify.pack.container import read_manifest

    path = sm.save(c, tmp_path / "s.smallify")
    assert all(r.get("codebook") == "int8" for r in read_manifest(path)["shared"].values())
    with torch.no_grad():           # fine-tuning moves the codebook off the grid: stored in float, loads back
        for m in c.modules():
            if isinstance(m, SharedTwin):
                m.codebook.add_(1e-3)
    moved = sm.save(c, tmp_path / "moved.smallify")
    assert not any(r.get("codebook") == "int8" for r in read_manifest(moved)["shared"].values())
    with torch.no_grad():
        assert torch.equal(sm.load(moved, small_net())(X), c(X))
    sm.snap_codebooks(c)
    assert all(r.get("codebook") == "int8" for r in read_manifest(sm.save(c, tmp_path / "s2.smallify"))["shared"].values())
    q = sm.quantize(_expanded(c), sm.Int8Static(), data=X, progress=False)
    onnx_path = tmp_path / "s.int8.onnx"
    sm.export_onnx(q, onnx_path, X[:1])
    proto = onnx.load(onnx_path)
    ints = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8
            and len(i.dims) >= 2]
    assert len(ints) == 4
    for w in ints:       # the sharing survives per-channel INT8: each channel keeps <= 16 int8 values
        assert max(len(np.unique(row)) for row in w.reshape(w.shape[0], -1)) <= 16


def _expanded(model):
    import copy

    from smallify.cluster import expand

    return expand(copy.deepcopy(model))


def test_onnx_index_form_gives_the_same_output_from_a_smaller_file(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    c = sm.cluster(net, sm.KMeans(clusters=15, scope="channel"), progress=False)
    x = torch.randn(8, 256)
    outs, sizes = {}, {}
    for form in ("expand", "indices"):
        path = sm.export_onnx(c, tmp_path / f"{form}.onnx", x[:1], shared=form)
        sizes[form] = path.stat().st_size
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs[form] = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = c(x).numpy()
    assert np.allclose(outs["expand"], ref, atol=1e-5) and np.allclose(outs["indices"], ref, atol=1e-5)
    assert sizes["indices"] < sizes["expand"] / 4          # 4-bit indices + codebooks against float32


def test_bad_configs_and_layers_name_the_problem():
    with pytest.raises(ConfigError, match="clusters=300"):
        sm.KMeans(clusters=300)
    with pytest.raises(ConfigError, match="clusters=1"):
        sm.KMeans(clusters=1)
    with pytest.raises(ConfigError, match="group_size"):
        sm.KMeans(scope="group")
    with pytest.raises(ConfigError, match="scope='row'"):
        sm.KMeans(scope="row")
    with pytest.raises(ConfigError, match="layer '7' has 16 weight.*fewer than clusters=32"):
        sm.cluster(small_net(), sm.KMeans(clusters=32, scope="channel"), progress=False)
    with pytest.raises(ConfigError, match="layer '0'.*group_size=5"):
        sm.cluster(small_net(), sm.KMeans(clusters=4, scope="group", group_size=5), progress=False)
    with pytest.raises(ConfigError, match="takes config"):
        sm.cluster(small_net(), sm.Int8Static())
    assert rows_shape((16, 8, 3, 3), "group", 8) == (16 * 9, 8)


def test_a_file_whose_codebook_and_indices_disagree_is_refused(tmp_path):
    c = sm.cluster(small_net(), sm.KMeans(clusters=8), progress=False)
    path = sm.save(c, tmp_path / "c.smallify")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(meta["smallify"])
    layer = next(iter(manifest["shared"]))
    manifest["shared"][layer]["share"]["k"] = 4          # the stream holds indices up to 7
    manifest["shared"][layer]["alphabet"] = 4
    bad = tmp_path / "bad.smallify"
    save_file(tensors, str(bad), metadata={"smallify": json.dumps(manifest)})
    with pytest.raises(ModelError, match=f"layer '{layer}'"):
        sm.load(bad, small_net())


def test_hashed_model_is_stored_as_buckets_and_loads_back_bit_exact(tmp_path):
    net = small_net()
    h = sm.cluster(net, sm.HashShare(compression=1 / 8, seed=3), progress=False)
    path = sm.save(h, tmp_path / "h.smallify")
    back = sm.load(path, small_net())
    with torch.no_grad():
        assert torch.equal(back(X), h(X))
    buckets = sum(p.numel() for n, p in h.named_parameters() if n.endswith("buckets"))
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert abs(buckets - weights / 8) <= 4
    assert path.stat().st_size < sm.save(net, tmp_path / "f.smallify").stat().st_size / 3


def test_train_with_a_checkpoint_learns_the_centroids_and_resumes(tmp_path):
    net = sm.cluster(small_net(), sm.KMeans(clusters=8, scope="channel"), progress=False)
    before = {n: m.indices.clone() for n, m in net.named_modules() if isinstance(m, SharedTwin)}
    codebooks = {n: m.codebook.detach().clone() for n, m in net.named_modules() if isinstance(m, SharedTwin)}
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    data = sm.TrainData(X, y, batch_size=4)
    ckpt = tmp_path / "run.ckpt"
    sm.train(net, data, sm.TrainConfig(epochs=1, lr=1e-2, checkpoint_every=2), checkpoint=ckpt, progress=False)
    assert ckpt.exists()
    for n, m in net.named_modules():
        if isinstance(m, SharedTwin):
            assert torch.equal(m.indices, before[n]) and not torch.equal(m.codebook.detach(), codebooks[n])
    again = sm.cluster(small_net(), sm.KMeans(clusters=8, scope="channel"), progress=False)
    sm.train(again, data, sm.TrainConfig(epochs=1, lr=1e-2, checkpoint_every=2), checkpoint=ckpt, progress=False)
    with torch.no_grad():       # the finished run's checkpoint restores the trained centroids exactly
        assert torch.equal(again(X), net(X))
