"""Residual-branch removal: the rewritten graph computes exactly the model without the branch, the choice
follows the measured output error per MAC, and the result prunes further, exports, saves and loads."""
import onnxruntime as ort
import pytest
import torch
from torch import nn

import smallify as sm
from smallify.errors import ConfigError, DataError, ModelError
from smallify.examples.models import ResNet
from smallify.prune.branches import choose_branches, find_branches, remove_branches


def _seeded() -> nn.Module:
    torch.manual_seed(3)
    m = ResNet((2, 2), (8, 16), 1, 10, "small").eval()
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=g) * 0.2 - 0.1)
    return m


def test_find_branches_lists_every_residual_branch(calib):
    m = _seeded()
    found = find_branches(m, calib[:2])
    assert [b.add for b in found] == ["add", "add_1", "add_2", "add_3"]
    # the main branch goes, never the downsample shortcut (the lighter side)
    assert found[2].modules == ["layers.1.0.bn1", "layers.1.0.bn2", "layers.1.0.conv1", "layers.1.0.conv2",
                                "layers.1.0.relu"]
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert find_branches(plain, calib[:2]) == []


def test_removal_is_exact(calib):
    m = _seeded()
    found = {b.add: b for b in find_branches(m, calib[:2])}
    # identity shortcut: the block becomes relu(x) of a ReLU output, i.e. the block disappears
    gm = remove_branches(m, [found["add_1"]])
    ref = ResNet((2, 2), (8, 16), 1, 10, "small").eval()
    ref.load_state_dict(m.state_dict())
    ref.layers[0][1] = nn.Identity()
    assert torch.equal(gm(calib), ref(calib))
    assert not any(k.startswith("layers.0.1.") for k in gm.state_dict())
    # 9 ReLU calls before (the stem's, two per block); the branch's and the redundant one after the sum go
    relus = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)]
    assert len(relus) == 7
    # downsample shortcut: the block becomes relu(downsample(x))
    gm = remove_branches(m, [found["add_2"]])
    block = m.layers[1][0]

    def manual(x):
        h = m.layers[0](m.stem(x))
        h = torch.relu(block.downsample(h))
        return m.fc(torch.flatten(m.pool(m.layers[1][1](h)), 1))

    assert torch.equal(gm(calib), manual(calib))


def test_choice_follows_output_error_per_mac(calib):
    m = _seeded()
    with torch.no_grad():     # a branch that outputs exact zeros costs nothing to remove
        m.layers[1][1].bn2.weight.zero_()
        m.layers[1][1].bn2.bias.zero_()
    records, chosen = choose_branches(m, 2, calib[:2], calib)
    assert chosen[0].add == "add_3" and records[0]["output_error"] == 0.0
    assert records[1]["output_error"] > 0 and records[0]["macs_saved"] > 0 and records[1]["macs_saved"] > 0
    scores = [r["output_error"] / r["macs_saved"] for r in choose_branches(m, 4, calib[:2], calib)[0]]
    assert scores == sorted(scores)


def test_prune_with_branches_exports_saves_and_loads(tmp_path, calib):
    m = _seeded()
    p = sm.prune(m, sm.ChannelPrune(ratio=0.5, branches=2), calib[:2], data=calib)
    assert len(p.prune_report.branches) == 2 and "removed branch" in str(p.prune_report)
    assert p.prune_report.macs_ratio < 0.3
    sm.export_onnx(p, tmp_path / "p.onnx", calib[:1])
    s = ort.InferenceSession(str(tmp_path / "p.onnx"))
    assert torch.allclose(torch.from_numpy(s.run(None, {"input": calib.numpy()})[0]), p(calib), atol=1e-4)
    sm.save(p, tmp_path / "p.smallify")
    back = sm.load(tmp_path / "p.smallify", _seeded())
    assert torch.equal(back(calib), p(calib))


def test_branch_errors(calib):
    m = _seeded()
    with pytest.raises(ConfigError, match="branches=-1"):
        sm.ChannelPrune(branches=-1)
    with pytest.raises(ConfigError, match="4 removable"):
        sm.prune(m, sm.ChannelPrune(ratio=0.1, branches=5), calib[:2], data=calib)
    with pytest.raises(DataError, match="needs data"):
        sm.prune(m, sm.ChannelPrune(ratio=0.1, branches=1), calib[:2])
    with pytest.raises(ModelError, match="no residual sum 'add_9'"):
        remove_branches(m, [["add_9", 0]])
