"""The main job, end to end on the real data and the committed trained weights."""
import json

import pytest

from smallify.examples import fashion_mnist


@pytest.mark.slow
def test_demo_meets_the_accuracy_and_size_targets(tmp_path):
    if not (fashion_mnist.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST missing: `make test` installs it (apt-get install -y dataset-fashion-mnist)")
    from smallify.examples.demo import run_demo

    result = run_demo(tmp_path, threads=2, budget_s=1.0)
    rows = {r.name: r for r in result["rows"]}
    fp32 = rows["ONNX Runtime FP32"].metrics["top1"]
    assert fp32 >= 0.92                                        # the bundled model's trained accuracy
    assert rows["PyTorch FP32"].metrics["top1"] == pytest.approx(fp32, abs=2e-4)
    assert result["top1_drop_points"] <= 0.5                   # INT8 within half a point of FP32
    assert result["int8_size_ratio_to_fp32_onnx"] <= 0.27
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["top1_drop_points"] == pytest.approx(result["top1_drop_points"])
    assert {r["name"] for r in saved["rows"]} == set(rows)
