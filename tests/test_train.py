"""The training loop: it learns, evaluates per epoch, resumes exactly after being killed mid-epoch, and trains
data-parallel in two processes (gloo)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import smallify as sm
from smallify.errors import ConfigError, DataError


def _data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + 2 * (x[:, 3] > 0).long()
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))


def _accuracy(x, y):
    def fn(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())
    return fn


def test_train_learns_and_evaluates_each_epoch():
    x, y = _data()
    model = _model()
    before = _accuracy(x, y)(model)
    res = sm.train(model, sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=3, lr=1e-2), eval_fn=_accuracy(x, y),
                   progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and res.steps == 48
    assert res.history[-1]["metric"] > max(0.85, before + 0.3)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import smallify as sm
    from test_train import _data, _model
    x, y = _data()
    calls = [0]
    def loss(out, target, inputs):
        calls[0] += 1
        if calls[0] == 23:                      # mid-epoch 2, after the checkpoint at step 20
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.nn.functional.cross_entropy(out, target)
    sm.train(_model(), sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=3, lr=1e-2, checkpoint_every=10),
             loss_fn=loss, checkpoint={ckpt!r}, progress=False)
""")


def test_resume_after_kill_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    x, y = _data()
    ckpt = tmp_path / "run.ckpt"
    code = SCRIPT.format(tests=os.path.dirname(__file__), ckpt=str(ckpt))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr                     # killed
    assert torch.load(ckpt, weights_only=True)["step"] == 20
    resumed = _model()
    res = sm.train(resumed, sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=3, lr=1e-2, checkpoint_every=10),
                   checkpoint=ckpt, progress=False)
    assert res.resumed_from == 20 and res.steps == 48
    straight = _model()
    sm.train(straight, sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=3, lr=1e-2), progress=False)
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def _ddp_worker(rank, world, init_file, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = _data()
    model = _model()
    res = sm.train(model, sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=6, lr=1e-2),
                   eval_fn=_accuracy(x, y), checkpoint=out / "ddp.ckpt", progress=False)
    torch.save({"state": model.state_dict(), "steps": res.steps, "acc": res.history[-1]["metric"]}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_data_parallel_two_processes(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 48            # 16 batches a process per epoch, one per process per step
    for a, b in zip(r0["state"].values(), r1["state"].values()):
        assert torch.equal(a, b)                        # gradients all-reduced: the replicas agree
    assert r0["acc"] > 0.8
    assert torch.load(tmp_path / "ddp.ckpt", weights_only=True)["step"] == 48


TORCHRUN_SCRIPT = """
import sys
import torch
import smallify as sm
from smallify.train import rank_and_world
sys.path.insert(0, {tests!r})
from test_train import _accuracy, _data, _model

x, y = _data()
model = _model()
res = sm.train(model, sm.TrainData(x, y, batch_size=32), sm.TrainConfig(epochs=2, lr=1e-2), eval_fn=_accuracy(x, y),
               progress=False)
rank, world = rank_and_world()
torch.save({{"state": model.state_dict(), "steps": res.steps, "world": world}}, {out!r} + f"/rank{{rank}}.pt")
"""


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_trains_data_parallel(tmp_path):
    """Launched by torchrun, smallify.train starts the gloo process group itself; the replicas agree."""
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    r = _torchrun(script, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 16      # 8 steps an epoch
    for a, b in zip(r0["state"].values(), r1["state"].values()):
        assert torch.equal(a, b)


def test_torchrun_cli_distill_writes_once(tmp_path):
    import numpy as np

    from smallify.examples.demo import calibration_images

    x = calibration_images(512, seed=4)
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "student.smallify"
    r = _torchrun("-m", "smallify.cli", "distill", "--student", "example", "--data", tmp_path / "d.npz",
                  "--epochs", "1", "--batch-size", "64", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("data-parallel: 2 processes") == 1 and r.stdout.count("wrote") == 1
    assert out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_bad_training_input():
    x, y = _data()
    with pytest.raises(ConfigError, match="optimizer='lion' is not supported"):
        sm.TrainConfig(optimizer="lion")
    with pytest.raises(DataError, match="inputs hold 512 samples but labels 3"):
        sm.TrainData(x, y[:3])
    with pytest.raises(DataError, match="accepted: smallify.TrainData"):
        sm.train(_model(), [(x, y)])
    with pytest.raises(DataError, match="eval_fn returned 'good'"):
        sm.train(_model(), sm.TrainData(x, y), sm.TrainConfig(epochs=0.1), eval_fn=lambda m: "good", progress=False)
