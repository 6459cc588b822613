"""The op -> handler table of the dependency graph and the per-layer-type resize handlers: Conv1d, GroupNorm,
LayerNorm and split are pruned (not frozen), each pruned net computes what a reference written by hand from
the kept channels computes, the container rebuilds them, and users register their own layer."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallify as sm
from smallify.prune import graph as graph_mod
from smallify.prune import resize


def keep_highest_index(modules, group, stats):
    """Importance = channel index: the kept channels are the last ones of every group, known in advance."""
    return torch.arange(group.size, dtype=torch.float32)


def kept(n, k):
    return torch.arange(n - k, n)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv1d(16, 12, 3, padding=1)
        self.bn = nn.BatchNorm1d(12)
        self.c3a, self.c3b = nn.Conv1d(6, 6, 1), nn.Conv1d(6, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):                                   # (N, 3, L)
        h = torch.relu(self.gn(self.c1(x)))                 # (N, 16, L)
        h = torch.relu(self.bn(self.c2(h)))                 # (N, 12, L)
        a, b = h.chunk(2, dim=1)                            # (N, 6, L) x 2: channel j of a goes with j of b
        h = self.c3a(a) + self.c3b(b)                       # (N, 6, L)
        return self.fc(h.mean(2))


def _randomize_norms(m):
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():
        if isinstance(mod, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d)):
            mod.weight.data = torch.rand(mod.weight.shape, generator=g) + 0.5
            mod.bias.data = torch.rand(mod.bias.shape, generator=g) - 0.5
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


def conv1d_reference(m, x):
    """Conv1dNet on the kept channels, written out with the original weights."""
    k1 = kept(16, 8)                                        # GroupNorm(4): 8 kept, a multiple of 4
    kc = kept(6, 3)                                         # both chunks keep the same channels
    k2 = torch.cat([kc, 6 + kc])
    k3 = kept(6, 3)
    h = F.conv1d(x, m.c1.weight[k1], m.c1.bias[k1], padding=1)
    h = torch.relu(F.group_norm(h, 4, m.gn.weight[k1], m.gn.bias[k1], m.gn.eps))
    h = F.conv1d(h, m.c2.weight[k2][:, k1], m.c2.bias[k2], padding=1)
    h = torch.relu(F.batch_norm(h, m.bn.running_mean[k2], m.bn.running_var[k2], m.bn.weight[k2], m.bn.bias[k2],
                                False, 0.0, m.bn.eps))
    a, b = h[:, :3], h[:, 3:]
    h = F.conv1d(a, m.c3a.weight[k3][:, kc], m.c3a.bias[k3]) + F.conv1d(b, m.c3b.weight[k3][:, kc], m.c3b.bias[k3])
    return F.linear(h.mean(2), m.fc.weight[:, k3], m.fc.bias)


def test_conv1d_groupnorm_chunk_are_pruned_like_the_reference(tmp_path):
    torch.manual_seed(0)
    m = _randomize_norms(Conv1dNet())
    x = torch.randn(8, 3, 20)
    p = sm.prune(m, sm.ChannelPrune(ratio=0.5, importance=keep_highest_index), x)
    assert (p.c1.out_channels, p.gn.num_channels, p.gn.num_groups) == (8, 8, 4)
    assert (p.c2.out_channels, p.bn.num_features, p.c3a.in_channels, p.c3b.in_channels) == (6, 6, 3, 3)
    assert (p.c3a.out_channels, p.fc.in_features) == (3, 3)
    assert not any("frozen" in g and g["producers"] != ["fc"] for g in p.report.groups), p.report.groups
    with torch.no_grad():
        assert torch.allclose(p(x), conv1d_reference(m, x), atol=1e-5)
        sm.save(p, tmp_path / "p.smallify")                 # fit_shapes rebuilds the shapes on a fresh net
        assert torch.equal(sm.load(tmp_path / "p.smallify", Conv1dNet())(x), p(x))


def test_groupnorm_keeps_a_multiple_of_its_groups():
    torch.manual_seed(0)
    p = sm.prune(_randomize_norms(Conv1dNet()), sm.ChannelPrune(ratio=0.3, importance=keep_highest_index),
                 torch.randn(2, 3, 20))
    assert p.gn.num_channels % 4 == 0 and p.gn.num_channels < 16


class LayerNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):                                   # (N, T, 8)
        h, gate = self.fc1(x).chunk(2, dim=-1)              # (N, T, 8) x 2: chunk on the channel axis
        return self.fc2(self.ln(torch.cat([F.gelu(h), gate], -1)))


def test_layernorm_and_chunk_are_pruned_like_the_reference():
    torch.manual_seed(0)
    m = _randomize_norms(LayerNormMLP())
    x = torch.randn(4, 5, 8)
    p = sm.prune(m, sm.ChannelPrune(ratio=0.5, importance=keep_highest_index), x)
    assert (p.fc1.out_features, p.ln.normalized_shape, p.fc2.in_features) == (8, (8,), 8)
    k = torch.cat([kept(8, 4), 8 + kept(8, 4)])             # the chunks are one group: the last 4 of each kept
    h, gate = F.linear(x, m.fc1.weight[k], m.fc1.bias[k]).chunk(2, dim=-1)
    want = F.linear(F.layer_norm(torch.cat([F.gelu(h), gate], -1), (8,), m.ln.weight[k], m.ln.bias[k], m.ln.eps),
                    m.fc2.weight[:, k], m.fc2.bias)
    with torch.no_grad():
        assert torch.allclose(p(x), want, atol=1e-5)


def test_split_into_fixed_sizes_freezes_and_says_why():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv1d(3, 12, 1), nn.Conv1d(8, 4, 1)

        def forward(self, x):
            a, b = torch.split(self.c1(x), [4, 8], dim=1)
            return self.c2(b) + a

    g = graph_mod.build(Split().eval(), torch.randn(2, 3, 5))
    c1 = next(gr for gr in g.groups if gr.producers == ["c1"])
    assert "split" in c1.frozen and "constants of forward" in c1.frozen


class Scale(nn.Module):
    """A user's layer: a learned per-channel scale of a feature map."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


def test_users_register_a_handler_for_their_layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), Scale(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    with pytest.raises(sm.ModelError, match=r"every channel group is frozen"):   # unknown: traced through, frozen
        sm.prune(m, sm.ChannelPrune(ratio=0.5), x)

    @resize.register_resize(Scale)
    class ScaleResize:
        sizes = staticmethod(lambda s: {"norm": s.weight.shape[0]})
        saved_sizes = staticmethod(lambda s, name, state: {"norm": state[f"{name}.weight"].shape[0]})

        @staticmethod
        def keep(s, dim, idx):
            s.weight = nn.Parameter(s.weight.detach()[idx].clone())

    @graph_mod.register_handler(Scale)
    def scale_handler(b, n, s):
        b.add_slots(b.input_layout(n), n.target, "norm")
        return b.pass_through(n)

    try:
        p = sm.prune(m, sm.ChannelPrune(ratio=0.5, importance=keep_highest_index), x)
        k = kept(8, 4)
        want = F.conv2d(torch.relu(F.conv2d(x, m[0].weight[k], m[0].bias[k]) * m[1].weight[k].view(1, -1, 1, 1)),
                        m[3].weight[:, k], m[3].bias)
        assert p[1].weight.shape == (4,) and torch.allclose(p(x), want, atol=1e-5)
    finally:
        del graph_mod.MODULE_HANDLERS[Scale], resize.RESIZERS[Scale]
