"""Structured pruning: the dependency graph couples what must shrink together, the pruned model is really
smaller (MACs, ONNX), computes what the kept channels computed, and bad input gets clear errors."""
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallify as sm
from smallify.errors import ConfigError, ModelError
from smallify.measure import count_macs
from smallify.prune.graph import build


class Branchy(nn.Module):
    """Concatenation, a depthwise convolution, a squeeze-excite style multiply and a Linear after flatten."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.se = nn.Conv2d(14, 14, 1)
        self.head = nn.Conv2d(14, 10, 1)
        self.fc = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = self.dw(y)
        y = y * torch.sigmoid(self.se(F.adaptive_avg_pool2d(y, 1)))
        y = F.adaptive_avg_pool2d(torch.relu(self.head(y)), 4)
        return self.fc(torch.flatten(y, 1))


def test_graph_groups_residual_stages(model, calib):
    g = build(model, calib[:2])
    stage = next(gr for gr in g.groups if "layers.1.0.downsample.0" in gr.producers)
    # the residual stage couples the downsample, both blocks' last convolutions and every reader of the sum
    assert set(stage.producers) == {"layers.1.0.downsample.0", "layers.1.0.conv2"} and stage.frozen is None
    assert {s.module for s in stage.slots if s.dim == "bn"} == {"layers.1.0.downsample.1", "layers.1.0.bn2"}
    assert ("fc", "in") in {(s.module, s.dim) for s in stage.slots}
    assert next(gr for gr in g.groups if gr.producers == ["fc"]).frozen == "reaches the model output"


def test_graph_concat_depthwise_multiply_flatten():
    m = Branchy().eval()
    g = build(m, torch.randn(2, 3, 8, 8))
    a = next(gr for gr in g.groups if "a" in gr.producers)
    # x * sigmoid(se(...)) merges se's output with the concat: its first 8 channels join a's group
    assert sorted(a.producers) == ["a", "se"] and a.size == 8 and a.frozen is None
    slots = {(s.module, s.dim, s.offset, s.factor) for s in a.slots}
    assert {("bn", "bn", 0, 1), ("dw", "dw", 0, 1), ("se", "in", 0, 1), ("se", "out", 0, 1), ("head", "in", 0, 1)} <= slots
    b = next(gr for gr in g.groups if "b" in gr.producers)
    assert {("bn", "bn", 8, 1), ("se", "out", 8, 1), ("head", "in", 8, 1)} <= {(s.module, s.dim, s.offset, s.factor)
                                                                              for s in b.slots}
    head = next(gr for gr in g.groups if gr.producers == ["head"])
    assert ("fc", "in", 0, 16) in {(s.module, s.dim, s.offset, s.factor) for s in head.slots}


def test_pruned_branchy_model_runs_and_exports(tmp_path):
    m = Branchy().eval()
    x = torch.randn(8, 3, 8, 8)
    p = sm.prune(m, sm.ChannelPrune(ratio=0.5), x[:2])
    assert p(x).shape == (8, 5)
    assert p.a.out_channels == 4 and p.b.out_channels == 3 and p.dw.groups == 7 and p.fc.in_features == 5 * 16
    assert p.prune_report.macs_after < 0.5 * p.prune_report.macs_before
    sm.export_onnx(p, tmp_path / "p.onnx", x[:1])
    s = ort.InferenceSession(str(tmp_path / "p.onnx"))
    assert torch.allclose(torch.from_numpy(s.run(None, {"input": x.numpy()})[0]), p(x), atol=1e-4)


def test_removing_dead_channels_changes_nothing(calib):
    """Channels whose BatchNorm scale and shift are zero contribute nothing: removing them is exact."""
    from conftest import small_resnet

    model = small_resnet()
    bn = model.get_submodule("layers.0.0.bn1")
    with torch.no_grad():
        bn.weight[::2] = 0
        bn.bias[::2] = 0
    others = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "layers.0.0.conv1")
    p = sm.prune(model, sm.ChannelPrune(ratio=0.5, importance="bn_scale", ignore=others), calib[:2])
    assert p.get_submodule("layers.0.0.conv1").out_channels == 4 and p.get_submodule("layers.0.0.conv2").in_channels == 4
    assert torch.allclose(p(calib), model.eval()(calib), atol=1e-5)
    same = sm.prune(model, sm.ChannelPrune(ratio=0.0), calib[:2])
    assert torch.equal(same(calib), model(calib))


@pytest.mark.parametrize("importance", ["l2", "l1", "bn_scale", "taylor", "activation", "apoz"])
def test_every_criterion_prunes(model, calib, importance):
    labels = torch.randint(0, 10, (len(calib),), generator=torch.Generator().manual_seed(0))
    data = [(calib[i:i + 16], labels[i:i + 16]) for i in range(0, len(calib), 16)]
    p = sm.prune(model, sm.ChannelPrune(ratio=0.5, importance=importance, round_to=2), calib[:2], data=data)
    assert p(calib).shape == (64, 10) and p.prune_report.macs_ratio < 0.4
    assert all(g["after"] % 2 == 0 for g in p.prune_report.groups if "after" in g)


def test_global_scope_and_ignore(model, calib):
    p = sm.prune(model, sm.ChannelPrune(ratio=0.4, scope="global", ignore=("stem.0",)), calib[:2])
    groups = {tuple(g["producers"]): g for g in p.prune_report.groups}
    stem = next(g for k, g in groups.items() if "stem.0" in k)
    assert "after" not in stem and "ignored" in stem["frozen"]
    removed = sum(g["before"] - g["after"] for g in p.prune_report.groups if "after" in g)
    total = sum(g["before"] for g in p.prune_report.groups if "after" in g)
    assert 0.3 < removed / total <= 0.45


@torch.no_grad()
def test_reconstruction_recovers_without_training(model, calib):
    ref = model(calib)
    plain = sm.prune(model, sm.ChannelPrune(ratio=0.3), calib[:2])
    rec = sm.prune(model, sm.ChannelPrune(ratio=0.3, reconstruct=True), calib[:2], data=calib)
    err = lambda m: float((m(calib) - ref).pow(2).mean() / ref.pow(2).mean().detach())   # noqa: E731
    assert err(rec) < 0.5 * err(plain)


def test_bad_prune_input(model, calib):
    with pytest.raises(ConfigError, match=r"ratio=1.0 is not supported; accepted: a number in \[0, 1\)"):
        sm.ChannelPrune(ratio=1.0)
    with pytest.raises(ConfigError, match="accepted: l2, l1, bn_scale"):
        sm.ChannelPrune(importance="random")
    with pytest.raises(sm.DataError, match="needs data="):
        sm.prune(model, sm.ChannelPrune(importance="activation"), calib[:2])
    with pytest.raises(ConfigError, match="would leave group .* of layers.0.0.conv1 with no channels"):
        sm.prune(model, sm.ChannelPrune(ratio=0.3, layer_ratios={"layers.0.0.conv1": 0.99}), calib[:2])
    with pytest.raises(ConfigError, match=r"layer_ratios\['x'\]=1.5"):
        sm.ChannelPrune(layer_ratios={"x": 1.5})

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else -self.c(x)

    with pytest.raises(ModelError, match="cannot trace Untraceable.*ignore="):
        sm.prune(Untraceable(), sm.ChannelPrune(), calib[:2])


def test_count_macs_closed_form():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    assert count_macs(m, torch.randn(2, 3, 5, 5)) == 8 * 25 * 27 + 200 * 4


@torch.no_grad()
def test_reconstruction_with_groups_left_whole(model, calib):
    """round_to=8 keeps the 8-channel groups whole and halves the 16-channel ones: the layers reading a whole
    group are left as they are, the others are refitted, and the refit still lowers the output error."""
    config = dict(ratio=0.5, round_to=8)
    plain = sm.prune(model, sm.ChannelPrune(**config), calib[:2])
    rec = sm.prune(model, sm.ChannelPrune(**config, reconstruct=True), calib[:2], data=calib)
    sizes = {(g["before"], g["after"]) for g in rec.report.groups if "after" in g}
    assert (8, 8) in sizes and (16, 8) in sizes                     # some groups whole, some pruned
    assert rec.get_submodule("stem.0").out_channels == 8            # the stem's group (8) left whole
    ref = model(calib)
    err = lambda m: float((m(calib) - ref).pow(2).mean() / ref.pow(2).mean())   # noqa: E731
    assert err(rec) < 0.1 * err(plain), (err(rec), err(plain))     # measured 0.004 against 0.43


def _criterion_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                  # l1 and l2 disagree: even rows one large entry, odd rows 27 small ones
        w = torch.zeros(8, 27)
        for i in range(8):
            if i % 2 == 0:
                w[i, i] = 0.3 + 0.02 * i                        # l1 = l2 = 0.30..0.42
            else:
                w[i] = (0.016 + 0.0008 * i) * torch.sign(torch.randn(27, generator=g))   # l1 0.45.., l2 0.09..
        m[0].weight.copy_(w.reshape(8, 3, 3, 3))
    bn = m[1]
    bn.weight.data = torch.rand(8, generator=g) + 0.2      # gammas ranked differently from the conv's row norms
    bn.bias.data = torch.rand(8, generator=g) - 0.5
    bn.running_mean.copy_(torch.rand(8, generator=g) - 0.5)
    bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return m.eval()


def _closed_form(m, name, batches):
    """Each criterion's score of the first conv's 8 channels, written from its definition."""
    w = m[0].weight.detach()
    if name == "l2":
        return w.flatten(1).norm(dim=1)
    if name == "l1":
        return w.flatten(1).abs().sum(1)
    if name == "bn_scale":
        return m[1].weight.detach().abs()
    if name == "taylor":                                        # |sum(w * dL/dw)| per output channel
        m.zero_grad()
        for x, y in batches:
            F.cross_entropy(m(x), y).backward()
        score = (w * m[0].weight.grad).flatten(1).sum(1).abs()
        m.zero_grad()
        return score
    with torch.no_grad():                                       # the BatchNorm output after ReLU
        a = torch.cat([torch.relu(m[1](m[0](x))) for x, _ in batches])
    return a.mean((0, 2, 3)) if name == "activation" else 1 - (a == 0).float().mean((0, 2, 3))


@pytest.mark.parametrize("importance", ["l2", "l1", "bn_scale", "taylor", "activation", "apoz"])
def test_each_criterion_keeps_the_channels_its_formula_ranks_first(importance):
    m = _criterion_net()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    want = torch.sort(torch.topk(_closed_form(m, importance, batches), 4).indices).values
    p = sm.prune(m, sm.ChannelPrune(ratio=0.5, importance=importance), x[:2], data=batches)
    rows = m[0].weight.detach().flatten(1)
    got = torch.tensor([int((rows - r).abs().sum(1).argmin()) for r in p[0].weight.detach().flatten(1)])
    assert got.tolist() == want.tolist()
    others = {c: torch.sort(torch.topk(_closed_form(m, c, batches), 4).indices).values.tolist()
              for c in ("l2", "l1", "bn_scale", "activation")}
    assert len({tuple(v) for v in others.values()}) == 4      # the net tells the criteria apart
