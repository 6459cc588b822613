"""A short run of the loader fuzzer (benchmarks/fuzz_loaders.py) and hypothesis properties for the same two
loaders: every input gives a typed smallify error or a valid result, never another exception or a hang."""
import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smallify as sm
from smallify.data import load_npz

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "fuzz_loaders.py"
spec = importlib.util.spec_from_file_location("fuzz_loaders", SCRIPT)
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    return {name: fuzz.Target(name, d) for name in ("container", "manifest", "npz")}


@pytest.mark.parametrize("name,execs", [("container", 600), ("manifest", 300), ("npz", 1500)])
def test_short_fuzz_run_finds_nothing(targets, tmp_path, name, execs):
    """A few seconds per target with a fixed seed; the seeds themselves must load (the control), and the
    mutations must reach both outcomes."""
    target = targets[name]
    controls = [fuzz.join_manifest(*parts) for parts in target.parts] if name == "manifest" else target.seeds
    assert [target.run(c) for c in controls] == ["ok"] * len(controls)
    counts, found, _ = fuzz.run_mutate(target, execs, seed=7, timeout=10.0, crashes=tmp_path, report_every=1e9)
    assert not found, "\n".join(f"{k}\n{tb}" for k, (_, tb) in found.items())
    assert counts["ok"] + counts["error"] == execs
    assert counts["ok"] >= len(target.seeds) and counts["error"] >= execs // 2, counts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=2048))
def test_npz_reader_on_any_bytes(tmp_path, blob):
    p = tmp_path / "x.npz"
    p.write_bytes(b"PK\x03\x04" + blob if blob[:1] == b"\x00" else blob)
    try:
        arrays = load_npz(p, max_samples=3, max_bytes=1 << 20)
    except sm.DataError as e:
        assert "\n" not in str(e)
    else:
        assert all(a.shape[0] <= 3 for a in arrays.values())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["int", "fp8", "float", "e4m3", "weight_only", "int8_static", "fc1", "fc2"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["kind", "bits", "shape", "spec", "fmt", "signed", "symmetric", "per_channel", "group_size",
                         "name", "fc1", "fc2", "x"]), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 9), field=st.sampled_from(["config", "layers", "sparse", "removed_branches",
                                                        "version", "layer", "spec"]), value=json_values)
def test_container_manifest_with_any_value(targets, tmp_path, which, field, value):
    """One field of a valid manifest replaced by any JSON value: a ModelError/ConfigError or a model."""
    target = targets["manifest"]
    header, tensors, text = target.parts[which % len(target.parts)]
    manifest = json.loads(text)
    layers = manifest.get("layers") or {}
    if field == "layer" and layers:
        layers[sorted(layers)[0]] = value
    elif field == "spec" and layers:
        layers[sorted(layers)[0]]["spec"] = value
    else:
        manifest[field] = value
    p = tmp_path / "m.smallify"
    p.write_bytes(fuzz.join_manifest(header, tensors, json.dumps(manifest)))
    try:
        model = sm.load(p, fuzz.tiny())
    except sm.SmallifyError as e:
        assert "\n" not in str(e)
    else:
        assert model(fuzz.torch.ones(2, 32)).shape == (2, 8)      # a model that loads computes
