"""compress on small models: the search's records, choice, Pareto front, files, resume, replay and bad input.
Numbers checked against the records themselves and closed forms (Pareto front recomputed by brute force)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import smallify as sm
from smallify.errors import DataError
from smallify.tune import BudgetError, replay
from smallify.tune.pareto import dominates

import tiny_compress as tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _goal(**kw):
    base = dict(max_drop=1.0, metric=tiny.cosine, batch=(1, 8), timing_seconds=0.2, finetune=1, epochs=1.0,
                families=("quantize", "prune"))
    base.update(kw)
    return sm.Goal(**base)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compress")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 12, 12)).astype(np.float32)
    model = tiny.cnn()
    tiny.write_reference(model, x[:32], folder / "ref.npz")
    mp = pytest.MonkeyPatch()
    mp.setenv("TINY_COMPRESS_REF", str(folder / "ref.npz"))
    mp.setenv("SMALLIFY_CACHE_DIR", str(folder / "cache"))
    yield folder, model, torch.from_numpy(x)
    mp.undo()


@pytest.fixture(scope="module")
def searched(env):
    folder, model, x = env
    train = sm.TrainData(x, None, batch_size=16)
    result = sm.compress(model, _goal(), x, train_data=train, out=folder / "run", progress=False)
    return folder / "run", result


def test_every_candidate_recorded_and_consistent(searched):
    out, result = searched
    doc = json.loads((out / "result.json").read_text())
    assert doc == json.loads(json.dumps(result.to_dict()))
    assert doc["kind"] == "smallify-compress-result" and doc["schema_version"] == 1
    names = [c["name"] for c in doc["candidates"]]
    assert "quantize(int8)" in names and "prune(0.3) > quantize(int8)" in names
    base = doc["baseline"]
    assert base["metric"] == pytest.approx(100.0, abs=1e-3)           # the float model against itself
    for c in doc["candidates"]:
        assert c["status"] in ("done", "failed", "pruned")
        if c["status"] == "done":
            assert c["drop"] == pytest.approx(base["metric"] - c["metric"], abs=1e-9)
            assert c["meets_bound"] == (c["drop"] <= 1.0)
            assert c["size_bytes"] == (out / "candidates" / c["id"] / "model.onnx").stat().st_size
            ratios = [c["latency_ms"][b] / base["latency_ms"][b] for b in ("1", "8")]
            assert c["objective"] == pytest.approx(float(np.sqrt(ratios[0] * ratios[1])), rel=1e-9)
        else:
            assert c["reason"]
    failed = {c["name"]: c["reason"] for c in doc["candidates"] if c["status"] == "failed"}
    assert "prune(0.5, 2 branches) > quantize(int8)" in failed      # no residual branch in this model


def test_pareto_front_and_choice(searched):
    out, result = searched
    doc = result.to_dict()
    done = [c for c in doc["candidates"] if c["status"] == "done"]
    size = lambda c: min(b for b in (c["size_bytes"], c["container_bytes"]) if b)      # noqa: E731
    pts = {c["id"]: (c["drop"], c["objective"], size(c)) for c in done}
    pts["baseline"] = (0.0, 1.0, size(doc["baseline"]))
    for c in done:                        # brute force: on the front iff nothing dominates it
        assert c["pareto"] == (not any(dominates(q, pts[c["id"]]) for k, q in pts.items() if k != c["id"]))
    valid = [c for c in done if c["meets_bound"]]
    chosen = min(valid, key=lambda c: c["objective"])
    assert doc["chosen"] == chosen["id"] and doc["bound_met"] and doc["closest"] is None
    assert (out / "best.onnx").read_bytes() == (out / "candidates" / chosen["id"] / "model.onnx").read_bytes()
    assert json.loads((out / "recipe.json").read_text()) == chosen["recipe"]
    steps = doc["chosen_steps"]
    assert steps[0]["step"] == "float" and steps[0]["metric"] == doc["baseline"]["metric"]
    assert steps[-1]["metric"] == chosen["metric"] and steps[-1]["latency_ms"] == chosen["latency_ms"]
    assert len(steps) == len(chosen["recipe"]["steps"]) + 1
    assert doc["verdict"].startswith(("chosen ", "no speed-up"))


def test_fine_tuning_went_to_a_promising_candidate(searched):
    _, result = searched
    doc = result.to_dict()
    tuned = [c for c in doc["candidates"] if any(s["verb"] == "distill" for s in c["recipe"]["steps"])]
    assert len(tuned) <= 1
    for c in tuned:                       # its untuned twin was faster than the best candidate within the bound
        twin = next(d for d in doc["candidates"]
                    if d["name"] == c["name"].replace(" > distill(1 ep)", ""))
        assert not twin["meets_bound"]


def test_resume_reuses_finished_candidates(env, searched, monkeypatch):
    folder, model, x = env
    out, first = searched
    import smallify.tune.search as search_module

    built = []
    real = search_module.build_job
    monkeypatch.setattr(search_module, "build_job", lambda job: built.append(job[1].name) or real(job))
    again = sm.compress(model, _goal(), x, train_data=sm.TrainData(x, None, batch_size=16), out=out, progress=False)
    tried = [c["name"] for c in first.to_dict()["candidates"]]
    assert not set(built) & set(tried)    # every candidate came from its record
    chosen = again.chosen["name"]         # (timing may choose another this time: only its new prefixes are built)
    assert all(chosen.startswith(name + " > ") for name in built), (built, chosen)
    assert [c["name"] for c in again.to_dict()["candidates"]] == tried
    assert {c["id"]: c["metric"] for c in again.to_dict()["candidates"]} == \
        {c["id"]: c["metric"] for c in first.to_dict()["candidates"]}


def test_killed_search_resumes_where_it_stopped(env, tmp_path, monkeypatch):
    _, model, x = env
    import smallify.tune.search as search_module

    real, built = search_module.build_job, []

    def dies_on_third(job):
        if len(built) == 2:
            raise KeyboardInterrupt
        built.append(job[1].name)
        return real(job)

    monkeypatch.setattr(search_module, "build_job", dies_on_third)
    goal = _goal(families=("quantize",))
    with pytest.raises(KeyboardInterrupt):
        sm.compress(model, goal, x, out=tmp_path / "k", progress=False)
    assert len(list((tmp_path / "k" / "candidates").glob("*/record.json"))) == 3       # baseline + 2
    first_two, built = list(built), []
    monkeypatch.setattr(search_module, "build_job", lambda job: built.append(job[1].name) or real(job))
    result = sm.compress(model, goal, x, out=tmp_path / "k", progress=False)
    assert not set(first_two) & set(built) and len(built) == len(result.to_dict()["candidates"]) - 2


def test_replay_gives_the_same_model(env, searched, tmp_path):
    _, model, x = env
    out, result = searched
    rec = replay(model, out / "recipe.json", x, train_data=sm.TrainData(x, None, batch_size=16),
                 metric=tiny.cosine, out=tmp_path / "replay", progress=False)
    import onnxruntime as ort

    feed = x[:8].numpy()
    a = ort.InferenceSession(str(out / "best.onnx")).run(None, {"input": feed})[0]
    b = ort.InferenceSession(str(tmp_path / "replay" / "model.onnx")).run(None, {"input": feed})[0]
    np.testing.assert_array_equal(a, b)
    doc = json.loads((out / "result.json").read_text())      # the latest search in `out` (the resume test reran it)
    chosen = next(c for c in doc["candidates"] if c["id"] == doc["chosen"])
    assert rec["metric"] == chosen["metric"]


def test_bound_not_met_writes_the_closest(env, tmp_path):
    _, model, x = env
    result = sm.compress(model, _goal(max_drop=0.0, families=("quantize",), metric=tiny.strict), x,
                         out=tmp_path / "n", progress=False)
    doc = result.to_dict()
    assert not result.bound_met and doc["chosen"] is None and doc["closest"]
    closest = result.chosen
    assert closest["drop"] == min(c["drop"] for c in doc["candidates"] if c["drop"] is not None)
    assert doc["verdict"].startswith("bound not met; closest candidate: " + closest["name"])
    assert (tmp_path / "n" / "closest.onnx").exists() and not (tmp_path / "n" / "best.onnx").exists()


def test_nothing_helps_on_a_tiny_mlp(env, tmp_path):
    folder, _, _ = env
    model = tiny.mlp()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32))
    tiny.write_reference(model, x[:32].numpy(), tmp_path / "ref.npz")
    import os

    old = os.environ["TINY_COMPRESS_REF"]
    os.environ["TINY_COMPRESS_REF"] = str(tmp_path / "ref.npz")
    try:
        result = sm.compress(model, _goal(families=("quantize",), max_drop=5.0), x, out=tmp_path / "m",
                             progress=False)
    finally:
        os.environ["TINY_COMPRESS_REF"] = old
    doc = result.to_dict()
    if doc["speedup"]:
        pytest.fail(f"a 16x4 Linear got faster? {doc['verdict']}")
    assert doc["verdict"].startswith("no speed-up on this runtime")


@pytest.mark.parametrize("metric, message", [(tiny.raises, "eval_fn raised RuntimeError: the evaluation set is missing"),
                                             (tiny.not_a_number, "eval_fn returned 'good' (str); it must return a number")])
def test_bad_metric_is_one_clear_error_and_nothing_written(env, tmp_path, metric, message):
    _, model, x = env
    with pytest.raises(DataError, match="the float model could not be scored") as e:
        sm.compress(model, _goal(metric=metric), x, out=tmp_path / "bad", progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "bad").exists()


def test_budget_too_small_for_one_candidate(env, tmp_path):
    _, model, x = env
    with pytest.raises(BudgetError, match=r"budget_minutes=0.001 is too small for one candidate.*give at least \d+ minutes"):
        sm.compress(model, _goal(budget_minutes=0.001), x, out=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_workers_build_the_same_candidates(env, tmp_path):
    _, model, x = env
    one = sm.compress(model, _goal(families=("quantize",)), x, out=tmp_path / "w1", progress=False).to_dict()
    two = sm.compress(model, _goal(families=("quantize",), workers=2), x, out=tmp_path / "w2",
                      progress=False).to_dict()
    assert {c["id"]: c["metric"] for c in one["candidates"]} == {c["id"]: c["metric"] for c in two["candidates"]}


@pytest.mark.slow
def test_ray_builds_the_same_candidates(env, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import os

    _, model, x = env
    here = os.path.dirname(os.path.abspath(tiny.__file__))    # Ray's workers import the test's metric module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    one = sm.compress(model, _goal(families=("quantize",)), x, out=tmp_path / "local", progress=False).to_dict()
    ray_run = sm.compress(model, _goal(families=("quantize",)), x, out=tmp_path / "ray", progress=False,
                          ray_address="local").to_dict()
    assert {c["id"]: c["metric"] for c in one["candidates"]} == {c["id"]: c["metric"] for c in ray_run["candidates"]}
