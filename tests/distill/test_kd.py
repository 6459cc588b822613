"""Knowledge distillation: the loss against a closed form, a student that learns from a teacher, feature
matching through an adapter, and clear errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smallify as sm
from smallify.distill import kd_loss
from smallify.errors import ModelError


def test_kd_loss_closed_form():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 3.0, -1.0]])
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    expected = float((p * (p.log() - q.log())).sum()) * 4
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)


def _data(n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4] @ torch.randn(4, 5, generator=g)).argmax(1)
    return x, y


def test_student_learns_from_teacher_soft_labels():
    x, y = _data()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 5))
    sm.train(teacher, sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=8, lr=1e-2), progress=False)
    student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))
    agree = lambda: float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())   # noqa: E731
    before = agree()
    sm.distill(student, teacher, sm.TrainData(x, None, batch_size=32), sm.KD(temperature=2.0, alpha=1.0),
               sm.TrainConfig(epochs=8, lr=1e-2), progress=False)
    assert agree() > max(0.8, before + 0.3)      # measured 0.84 (from 0.13)


def _feature_residual(student, teacher, x) -> float:
    """How much of the teacher's hidden features the student's cannot give through a linear map (the
    adapter's form): relative least-squares residual, 0 = perfectly matched."""
    with torch.no_grad():
        s, t = student[0](x), teacher[0](x)
    a = torch.cat([s, torch.ones(len(s), 1)], 1)
    fit = a @ torch.linalg.lstsq(a, t).solution
    return float((fit - t).pow(2).sum() / (t - t.mean(0)).pow(2).sum())


def test_feature_matching_with_adapter():
    """Through an adapter (8 -> 32 channels) the student's first layer learns the teacher's features (which
    lie in a 4-dimensional subspace, so 8 channels can hold them): without the feature term the same run
    leaves them far apart."""
    x, y = _data(512)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        teacher[0].weight.copy_(torch.randn(32, 4) @ torch.randn(4, 16) / 4)
    residual = {}
    for features in ({}, {"0": "0"}):
        torch.manual_seed(2)
        student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))
        sm.distill(student, teacher, sm.TrainData(x, y, batch_size=32),
                   sm.KD(features=features, feature_weight=10.0, alpha=1.0),
                   sm.TrainConfig(epochs=4, lr=1e-2), progress=False)
        residual[bool(features)] = _feature_residual(student, teacher, x)
        assert len(student.train_history) == 4
    assert residual[True] < 0.6 * residual[False], residual      # measured 0.10 against 0.25


def test_bad_distillation_input():
    x, y = _data(64)
    with pytest.raises(ModelError, match=r"outputs differ in shape: \(2, 3\) vs \(2, 5\)"):
        sm.distill(nn.Linear(16, 3), nn.Linear(16, 5), sm.TrainData(x, y))
    with pytest.raises(sm.ConfigError, match="temperature=0"):
        sm.KD(temperature=0)
    with pytest.raises(ModelError, match="no layer named"):
        sm.distill(nn.Linear(16, 5), nn.Linear(16, 5), sm.TrainData(x, y), sm.KD(features={"nope": "x"}))


def test_distill_leaves_the_teacher_trainable():
    x, y = _data(64)
    teacher = nn.Linear(16, 5)
    sm.distill(nn.Linear(16, 5), teacher, sm.TrainData(x, y), sm.KD(), sm.TrainConfig(epochs=0.5), progress=False)
    assert all(p.requires_grad for p in teacher.parameters())
