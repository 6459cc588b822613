"""Unstructured and N:M magnitude pruning: the masks hit the sparsity asked for, hold while training, fold in
at the end, and the saved file shrinks with the sparsity."""
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import smallify as sm
from smallify.errors import ConfigError
from smallify.prune.magnitude import cubic_sparsity, nm_mask


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparsity_is_exact(scope):
    m = sm.sparsify(_mlp(), sm.Unstructured(sparsity=0.75, scope=scope))
    ws = [m[0].weight, m[2].weight]
    if scope == "layer":
        assert [float((w == 0).float().mean()) for w in ws] == pytest.approx([0.75, 0.75], abs=1e-3)
    total = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert total == pytest.approx(0.75, abs=1e-3)
    # the smallest magnitudes went: every kept weight is at least as large as every pruned one (global)
    if scope == "global":
        orig = torch.cat([l.parametrizations.weight.original.detach().abs().flatten() for l in (m[0], m[2])])
        mask = torch.cat([l.parametrizations.weight[0].mask.flatten() for l in (m[0], m[2])]).bool()
        assert orig[mask].min() >= orig[~mask].max()


def test_nm_pattern_two_of_four():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, -0.2, 1.0]])
    assert nm_mask(w, 2, 4).tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]
    m = sm.sparsify(_mlp(), sm.Unstructured(pattern="2:4"))
    blocks = (m[0].weight != 0).reshape(-1, 4).sum(1)
    assert torch.all(blocks <= 2) and float((m[0].weight == 0).float().mean()) >= 0.5


def test_masks_hold_during_training_and_fold(tmp_path):
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    m = sm.sparsify(_mlp(), sm.Unstructured(sparsity=0.9))
    sm.train(m, sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=2, lr=1e-2), progress=False)
    assert sm.sparsity_of(m) == pytest.approx(0.9, abs=2e-3)
    out = m(x)
    sm.finalize(m)
    assert not parametrize.is_parametrized(m[0]) and torch.allclose(m(x), out)
    dense = _mlp()
    sm.save(dense, tmp_path / "dense.smallify")
    sm.save(m, tmp_path / "sparse.smallify")
    ratio = os.path.getsize(tmp_path / "sparse.smallify") / os.path.getsize(tmp_path / "dense.smallify")
    assert ratio < 0.16          # 10% of the values + 1 bit per weight of mask, and the dense biases
    assert torch.equal(sm.load(tmp_path / "sparse.smallify", _mlp())(x), m(x))


def _sparsity_trace(model: nn.Module) -> list[float]:
    """The sparsity each training forward pass sees (prune_gradually deep-copies the model; hooks come along)."""
    trace = []

    def hook(module, inputs, output):
        if module.training:
            trace.append(sm.sparsity_of(module))
    model.register_forward_hook(hook)
    return trace


def test_gradual_schedule_ramps_to_the_target():
    assert [round(cubic_sparsity(s, 100, 0.9), 4) for s in (0, 25, 75, 100)] == [0.0, 0.6333, 0.9, 0.9]
    x, y = torch.randn(512, 64), (torch.randn(512, 64)[:, :10]).argmax(1)
    model = _mlp()
    seen = _sparsity_trace(model)
    m = sm.prune_gradually(model, sm.TrainData(x, y, batch_size=32), sm.Unstructured(sparsity=0.8),
                           sm.TrainConfig(epochs=2, lr=1e-2), progress=False, update_every=4)
    assert sm.sparsity_of(m) == pytest.approx(0.8, abs=2e-3) and not parametrize.is_parametrized(m[0])
    # 32 steps: the masks follow the cubic ramp every 4 steps during training (not only at the end)
    assert len(seen) == 32 and m.sparsity_schedule == {"total_steps": 32, "update_every": 4, "ramp_steps": 24}
    expected = [cubic_sparsity(s - s % 4, 32, 0.8) for s in range(32)]
    assert seen == pytest.approx(expected, abs=2e-3)
    assert seen[24:] == pytest.approx([0.8] * 8, abs=2e-3)      # the last quarter trains at the target


def test_gradual_schedule_fits_a_short_run():
    """2 epochs over 384 samples (24 steps) at 90 %: the ramp ends by step 18 and 6 steps recover at the
    target. With a fixed interval of 50 steps the masks changed only at step 0 and after the last step."""
    x, y = torch.randn(384, 64), (torch.randn(384, 64)[:, :10]).argmax(1)
    model = _mlp()
    seen = _sparsity_trace(model)
    m = sm.prune_gradually(model, sm.TrainData(x, y, batch_size=32), sm.Unstructured(sparsity=0.9),
                           sm.TrainConfig(epochs=2, lr=1e-2), progress=False)
    assert m.sparsity_schedule == {"total_steps": 24, "update_every": 1, "ramp_steps": 18}
    assert len(seen) == 24 and len(set(round(s, 4) for s in seen)) >= 10      # >= 10 distinct levels
    assert seen[18:] == pytest.approx([0.9] * 6, abs=2e-3)
    assert all(a <= b + 1e-6 for a, b in zip(seen, seen[1:]))
    assert sm.sparsity_of(m) == pytest.approx(0.9, abs=2e-3)


def test_gradual_schedule_refuses_what_would_be_one_shot():
    x, y = torch.randn(384, 64), torch.randint(0, 10, (384,))
    data, cfg = sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=2, lr=1e-2)
    with pytest.raises(ConfigError, match=r"update_every=50 updates the masks 0 time\(s\) during the 18-step "
                                          r"ramp of this 24-step run .*accepted: at most 4, or None"):
        sm.prune_gradually(_mlp(), data, sm.Unstructured(sparsity=0.9), cfg, progress=False, update_every=50)
    with pytest.raises(ConfigError, match="needs at least 6 training steps; this run has 3"):
        sm.prune_gradually(_mlp(), sm.TrainData(x[:96], y[:96], batch_size=32), sm.Unstructured(sparsity=0.9),
                           sm.TrainConfig(epochs=1), progress=False)


def test_bad_unstructured_input():
    with pytest.raises(ConfigError, match=r"sparsity=1 is not supported; accepted: a number in \[0, 1\)"):
        sm.Unstructured(sparsity=1)
    with pytest.raises(ConfigError, match="accepted: 'N:M'"):
        sm.Unstructured(pattern="4:2")
    with pytest.raises(ConfigError, match="not divisible by 4"):
        sm.sparsify(nn.Sequential(nn.Linear(6, 4)), sm.Unstructured(pattern="2:4"))
