"""The HTML report of a compress result: self-contained, escaped, the same numbers as result.json (read back from
data-value cells), clear errors for bad result files, and a plot a real headless browser shows."""
from __future__ import annotations

import base64
import copy
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from smallify.errors import ModelError
from smallify.html import load_result, render, write_report
from smallify.html.plots import CHOSEN, PARETO, PEER, bound, drop_scale
from smallify.html.report import fmt_ms, sorted_candidates

EVIL = '<b>&"x"'


def _cand(id_, name, metric, drop, lat, size, **kw):
    c = {"id": id_, "name": name,
         "recipe": {"kind": "smallify-recipe", "schema_version": 1, "steps": [{"verb": "quantize", "config": {"kind": "int8"}}]},
         "status": "done", "reason": None, "metric": metric, "drop": drop, "latency_ms": lat, "size_bytes": size,
         "container_bytes": size // 3, "macs": 12_345_678, "params": 123_456, "meets_bound": True, "pareto": False,
         "seconds": 41.2, "layers": []}
    c.update(kw)
    return c


def normal() -> dict:
    """Top-1 as a fraction, drops in percentage points (as the schema's example), objective latency."""
    base = _cand("baseline", "float", 0.9344, 0.0, {"1": 1.25, "32": 20.0}, 1_000_000, container_bytes=None,
                 recipe={"kind": "smallify-recipe", "schema_version": 1, "steps": []}, meets_bound=True)
    layers = [{"step": "prune", "layer": "layer1.0.conv1", "choice": "kept 32/64 channels"},
              {"step": "quantize", "layer": "fc", "choice": "int8 per-channel"}]
    cands = [
        _cand("a1b2c3d4", "prune(0.5) > distill > quantize(int8)", 0.9312, 0.32, {"1": 0.41, "32": 5.2}, 234_567,
              pareto=True, layers=layers),
        _cand("b2", "quantize(int8)", 0.9330, 0.14, {"1": 0.62, "32": 8.125}, 260_001, pareto=True),
        _cand("c3", EVIL, 0.9101, 2.43, {"1": 0.3, "32": 4.0}, 200_000, meets_bound=False, pareto=True),
        _cand("d4", "cluster(16)", 0.9300, 0.44, {"1": 1.1, "32": 18.75}, 300_000),
        _cand("e5", "prune(0.9)", None, None, {}, 90_000, status="pruned", reason="proxy drop 12.0 > 5.0",
              container_bytes=None, macs=None, meets_bound=None, pareto=None),
        _cand("f6", "lowrank(0.25)", None, None, {}, 400_000, status="failed", reason="ModelError: no Linear",
              container_bytes=None, macs=None, meets_bound=None, pareto=None),
    ]
    steps = [{"step": "float", "label": "float", "metric": 0.9344, "drop": 0.0, "latency_ms": {"1": 1.25, "32": 20.0},
              "size_bytes": 1_000_000},
             {"step": "prune", "label": "prune(0.5)", "metric": 0.93, "drop": 0.44, "latency_ms": {"1": 0.8, "32": 11.0},
              "size_bytes": 520_000},
             {"step": "distill", "label": "distill", "metric": 0.9321, "drop": 0.23, "latency_ms": {"1": 0.79, "32": 10.9},
              "size_bytes": 520_000},
             {"step": "quantize", "label": "quantize(int8)", "metric": 0.9312, "drop": 0.32,
              "latency_ms": {"1": 0.41, "32": 5.2}, "size_bytes": 234_567}]
    return {"kind": "smallify-compress-result", "schema_version": 1, "smallify_version": "0.1.0",
            "created": "2026-11-24T03:10:00Z",
            "command": "smallify compress example --eval mypkg.ev:top1 --max-drop 0.5 --objective latency "
                       "--runtime openvino --out 'out/c <&>'",
            "machine": {"cpu": "AMD EPYC (avx2; 2 cores)", "versions": {"python": "3.11.2", "torch": "2.13.0",
                                                                       "onnxruntime": "1.31.0", "openvino": "2026.4.0"}},
            "goal": {"max_drop": 0.5, "metric": "top1", "higher_is_better": True, "objective": "latency",
                     "runtime": "openvino", "batch": [1, 32], "threads": 2, "budget_minutes": 30.0},
            "baseline": base, "candidates": cands, "chosen": "a1b2c3d4", "closest": None, "bound_met": True,
            "speedup": True,
            "verdict": "chosen prune(0.5) > distill > quantize(int8): 0.26x latency, 0.23x size, top1 drop 0.32 points",
            "chosen_steps": steps,
            "peers": [{"name": "NNCF INT8", "metric": 0.931, "drop": 0.34, "latency_ms": {"1": 0.5, "32": 6.1},
                       "size_bytes": 500_000}],
            "search_seconds": 812.5,
            "files": {"onnx": "best.onnx", "smallify": "best.smallify", "recipe": "recipe.json", "report": "report.html"}}


def bound_not_met() -> dict:
    r = normal()
    for c in r["candidates"]:
        if c["metric"] is not None:
            c["meets_bound"] = False
    r.update(chosen=None, closest="b2", bound_met=False, peers=[],
             verdict="bound not met; closest candidate: quantize(int8), top1 drop 0.14 points > 0.1")
    r["goal"]["max_drop"] = 0.1
    r["chosen_steps"] = r["chosen_steps"][:1] + [dict(r["chosen_steps"][3], label="quantize(int8)", metric=0.933,
                                                      drop=0.14, latency_ms={"1": 0.62, "32": 8.125}, size_bytes=260_001)]
    return r


def no_speedup() -> dict:
    """A loss-like metric (lower is better, drop in the metric's own units), objective size, runtime without gains."""
    r = normal()
    r["goal"].update(metric="loss", higher_is_better=False, objective="size", runtime="onnxruntime", max_drop=0.05)
    r["baseline"]["metric"] = 0.5
    for c, m in zip(r["candidates"], [0.52, 0.51, 0.6, 0.53]):
        c["metric"], c["drop"] = m, round(m - 0.5, 10)
        c["latency_ms"] = {"1": 1.3, "32": 21.0}
    r.update(speedup=False, verdict="no speed-up on this runtime: every candidate within the bound is slower")
    return r


RESULTS = {"normal": normal, "bound_not_met": bound_not_met, "no_speedup": no_speedup}


class Page(HTMLParser):
    """Tables as {table id: [row]} where a row is {"id": data-id, "cells": {data-key: (data-value, text)}};
    plus the text of elements by id."""

    def __init__(self, html: str):
        super().__init__()
        self.tables, self.text, self._table, self._cell, self._ids = {}, {}, None, None, []
        self.images = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append({"id": a.get("data-id"), "cells": {}})
        elif tag == "td" and "data-key" in a:
            self._cell = [a["data-key"], a["data-value"], ""]
        elif tag == "img":
            self.images.append(a)
        if "id" in a:
            self._ids.append([a["id"], tag, ""])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "td" and self._cell:
            self.tables[self._table][-1]["cells"][self._cell[0]] = (self._cell[1], self._cell[2])
            self._cell = None
        if self._ids and self._ids[-1][1] == tag:
            id_, _, text = self._ids.pop()
            self.text[id_] = text

    def handle_data(self, data):
        if self._cell:
            self._cell[2] += data
        for entry in self._ids:
            entry[2] += data


def _rows(page: Page, table: str) -> list[dict]:
    return [r for r in page.tables[table] if r["cells"]]


def _num(value: str):
    return None if value == "" else (float(value) if any(ch in value for ch in ".e") else int(value))


def check_measures(cells: dict, row: dict) -> None:
    """data-value equals the dict exactly; the text is the formatted value."""
    for key in ("metric", "drop"):
        value, text = cells[key]
        assert _num(value) == row[key]
        assert text == ("—" if row[key] is None else f"{row[key]:.4f}")
    for b in ("1", "32"):
        value, text = cells[f"latency_ms.{b}"]
        assert _num(value) == row["latency_ms"].get(b)
        assert text == fmt_ms(row["latency_ms"].get(b))
    assert _num(cells["size_bytes"][0]) == row["size_bytes"]


@pytest.mark.parametrize("name", RESULTS)
def test_self_contained_and_escaped(name):
    page = render(RESULTS[name]())
    for banned in ("http://", "https://", "<script", "<link", "src=\"//"):
        assert banned not in page.lower()
    assert EVIL not in page
    assert "&lt;b&gt;&amp;&quot;x&quot;" in page
    parsed = Page(page)
    assert [r["cells"]["name"][1] for r in _rows(parsed, "candidates") if r["id"] == "c3"] == [EVIL]
    assert parsed.text["command"] == RESULTS[name]()["command"]


@pytest.mark.parametrize("name", RESULTS)
def test_candidate_numbers_equal_the_json(name):
    result = RESULTS[name]()
    rows = _rows(Page(render(result)), "candidates")
    by_id = {c["id"]: c for c in result["candidates"]}
    assert [r["id"] for r in rows] == [c["id"] for c in sorted_candidates(result)]
    assert sorted(r["id"] for r in rows) == sorted(by_id)
    for r in rows:
        c, cells = by_id[r["id"]], r["cells"]
        check_measures(cells, c)
        assert _num(cells["container_bytes"][0]) == c["container_bytes"]
        assert _num(cells["macs"][0]) == c["macs"]
        assert cells["meets_bound"][0] == {True: "true", False: "false", None: ""}[c["meets_bound"]]
        assert cells["status"][1] == c["status"] and cells["reason"][1] == (c["reason"] or "—")
    objective = {"latency": lambda c: c["latency_ms"].get("32"), "size": lambda c: c["size_bytes"]}[result["goal"]["objective"]]
    ranked = [objective(by_id[r["id"]]) for r in rows if objective(by_id[r["id"]]) is not None]
    assert ranked == sorted(ranked) and len(ranked) >= 4


def test_order_and_dashes_of_the_normal_result():
    rows = _rows(Page(render(normal())), "candidates")
    assert [r["id"] for r in rows] == ["c3", "a1b2c3d4", "b2", "d4", "f6", "e5"]     # by 32-batch ms; untimed by name
    failed = rows[4]["cells"]
    assert failed["metric"] == ("", "—") and failed["latency_ms.32"] == ("", "—") and failed["macs"] == ("", "—")


@pytest.mark.parametrize("name", RESULTS)
def test_step_numbers_and_ratios(name):
    result = RESULTS[name]()
    rows = _rows(Page(render(result)), "steps")
    assert len(rows) == len(result["chosen_steps"])
    base = result["baseline"]
    for r, step in zip(rows, result["chosen_steps"]):
        cells = r["cells"]
        check_measures(cells, step)
        assert (cells["step"][1], cells["label"][1]) == (step["step"], step["label"])
        for b in ("1", "32"):
            assert float(cells[f"latency_ratio.{b}"][0]) == step["latency_ms"][b] / base["latency_ms"][b]
            assert cells[f"latency_ratio.{b}"][1] == f"{step['latency_ms'][b] / base['latency_ms'][b]:.2f}x"
        assert float(cells["size_ratio"][0]) == step["size_bytes"] / base["size_bytes"]
    assert rows[0]["cells"]["size_ratio"][1] == "1.00x"
    assert rows[-1]["cells"]["size_bytes"][1] in ("229.07 KB", "253.91 KB")   # 234567 B, 260001 B


def test_verdicts_say_plainly_what_happened():
    ok, missed, slow = (Page(render(f())).text["verdict"] for f in (normal, bound_not_met, no_speedup))
    assert "bound not met" not in ok and "no speed-up" not in ok and ok.startswith("chosen prune(0.5)")
    assert missed.startswith("bound not met; closest candidate: quantize(int8)")
    assert slow.startswith("no speed-up on this runtime (onnxruntime)")
    assert 'class="verdict warn"' in render(bound_not_met()) and 'class="verdict"' in render(normal())


def test_layers_peers_and_the_rest():
    page = Page(render(normal()))
    assert [(r["cells"]["layer"][1], r["cells"]["choice"][1]) for r in _rows(page, "layers")] == [
        ("layer1.0.conv1", "kept 32/64 channels"), ("fc", "int8 per-channel")]
    [peer] = _rows(page, "peers")
    check_measures(peer["cells"], normal()["peers"][0])
    assert float(peer["cells"]["latency_ratio.32"][0]) == 6.1 / 20.0
    assert page.text["search-time"] == "812.5 s (13 min 32 s)"
    missed = Page(render(bound_not_met()))
    assert "layers" not in missed.tables and missed.text["no-layers"].startswith("None")     # closest has no layers
    assert "peers" not in missed.tables and "no-peers" in missed.text


def test_number_formats_and_bound():
    assert [fmt_ms(x) for x in (0.41, 0.012345, 0.999, 5.2, 12.5, None)] == ["0.410", "0.0123", "0.999", "5.20", "12.50", "—"]
    assert drop_scale(normal()) == 100.0 and bound(normal()) == pytest.approx(0.9344 - 0.005, abs=1e-12)
    assert drop_scale(no_speedup()) == 1.0 and bound(no_speedup()) == pytest.approx(0.55, abs=1e-12)


def _colour_pixels(rgb, colour: str, tol: int = 24) -> int:
    import numpy as np
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb[..., :3].astype(int) - target).max(axis=-1) <= tol).sum())


def _png_pixels(data: bytes):
    import matplotlib.image
    return (matplotlib.image.imread(io.BytesIO(data), format="png")[..., :3] * 255).round().astype("uint8")


def test_plot_is_an_inline_png_with_the_markers():
    pytest.importorskip("matplotlib")
    [img] = Page(render(normal())).images
    assert img["src"].startswith("data:image/png;base64,")
    rgb = _png_pixels(base64.b64decode(img["src"].split(",", 1)[1]))
    assert rgb.shape[1] == 1200 and rgb.shape[0] == 440
    for colour in (PARETO, CHOSEN, PEER):
        assert _colour_pixels(rgb, colour) > 30, colour


def test_load_result_round_trip_and_errors(tmp_path):
    good = tmp_path / "result.json"
    good.write_text(json.dumps(normal()))
    assert load_result(good) == normal()
    cases = {"missing.json": None, "bad.json": "{not json", "kind.json": json.dumps({**normal(), "kind": "smallify-recipe"}),
             "list.json": "[1, 2]", "newer.json": json.dumps({**normal(), "schema_version": 2}),
             "lacks.json": json.dumps({k: v for k, v in normal().items() if k != "baseline"})}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ModelError) as e:
            load_result(tmp_path / name)
        message = str(e.value)
        assert name in message and "\n" not in message and "smallify-compress-result" in message
    assert "schema_version 2" in str(pytest.raises(ModelError, load_result, tmp_path / "newer.json").value)
    assert "lacks baseline" in str(pytest.raises(ModelError, load_result, tmp_path / "lacks.json").value)


def test_write_report_creates_the_folder_atomically(tmp_path):
    result = normal()
    path = write_report(result, tmp_path / "a" / "b" / "report.html")
    assert path.read_text(encoding="utf-8") == render(copy.deepcopy(result))
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *args],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium); the browser check needs it")
def test_report_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np
    result = normal()
    url = write_report(result, tmp_path / "report.html").as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    assert page.text["verdict"] == result["verdict"]
    rows = _rows(page, "candidates")
    assert [r["id"] for r in rows] == [c["id"] for c in sorted_candidates(result)]
    for r in rows:
        check_measures(r["cells"], next(c for c in result["candidates"] if c["id"] == r["id"]))
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", url)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    rgb = _png_pixels(shot.read_bytes())
    assert rgb.shape[:2] == (2400, 1280)
    region = rgb[120:800]                                     # the plot comes right after the title and verdict
    assert (region < 245).any(axis=-1).mean() > 0.02
    counts = {c: _colour_pixels(region, c) for c in (PARETO, CHOSEN, PEER)}
    assert all(n > 30 for n in counts.values()), counts
    assert len(np.unique(region.reshape(-1, 3) // 32, axis=0)) > 8
