"""The HTML report of a compress result (result.json of ``smallify compress``): one self-contained page, no
external address and no script; plots inline as base64 PNG; every number also in a ``data-value`` attribute."""
from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from smallify.errors import ModelError, OutputError
from smallify.files import write_atomic
from smallify.html.plots import largest_batch, pareto_png
from smallify.measure.size import format_bytes

KIND, SCHEMA_VERSION, REQUIRED = "smallify-compress-result", 1, ("goal", "baseline", "candidates")
DASH = "—"
_OBJECTIVE_KEY = {"size": "size_bytes", "macs": "macs", "params": "params"}

CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1240px;color:#222}
.verdict{font-size:1.2em;padding:14px 18px;border:3px solid #333;background:#fffbe6;border-radius:6px}
.verdict.warn{border-color:#8b0000;background:#fdf0f0}.verdict .flag{font-weight:bold;color:#b01515}
table{border-collapse:collapse;margin:8px 0 20px;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
td.text{text-align:left;white-space:normal}tr.chosen{background:#fff6d6}img{max-width:100%}
pre{background:#f6f6f6;padding:10px;white-space:pre-wrap}dt{font-weight:bold}"""


# ---- numbers ---------------------------------------------------------------------------------------------
def fmt_metric(x) -> str:
    return DASH if x is None else f"{x:.4f}"


def fmt_ms(x) -> str:
    """2 decimals; 3 significant digits below 1 ms."""
    return DASH if x is None else (f"{x:.2f}" if abs(x) >= 1 else f"{x:#.3g}")


def fmt_ratio(x) -> str:
    return DASH if x is None else f"{x:.2f}x"


def fmt_count(n) -> str:
    if n is None:
        return DASH
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _raw(x) -> str:
    """The exact value for ``data-value``: repr of numbers (round-trips through float()), true/false, '' for none."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    return repr(x) if isinstance(x, float) else str(x)


def _ratio(x, base):
    return x / base if x is not None and base not in (None, 0) else None


def cell(key: str, value, shown: str | None = None, text: bool = False) -> str:
    """One table cell: what people read, and the exact value in data-value (data-key says which field)."""
    shown = str(value) if shown is None else shown
    css = ' class="text"' if text else ""
    return f'<td data-key="{escape(key)}" data-value="{escape(_raw(value))}"{css}>{escape(shown)}</td>'


def text_cell(key: str, value) -> str:
    return cell(key, value, DASH if value in (None, "") else str(value), text=True)


# ---- rows ------------------------------------------------------------------------------------------------
def _batches(result: dict) -> list[str]:
    batches = {int(b) for b in (result.get("goal") or {}).get("batch") or []}
    for c in [result.get("baseline") or {}] + list(result.get("candidates") or []):
        batches |= {int(b) for b in c.get("latency_ms") or {}}
    return [str(b) for b in sorted(batches)]


def measure_cells(row: dict, base: dict, batches: list[str], ratios: bool = True) -> str:
    """metric, drop, latency per batch, size: the columns every table shares (with ratios to the baseline)."""
    out = [cell("metric", row.get("metric"), fmt_metric(row.get("metric"))),
           cell("drop", row.get("drop"), fmt_metric(row.get("drop")))]
    latency, base_latency = row.get("latency_ms") or {}, base.get("latency_ms") or {}
    for b in batches:
        out.append(cell(f"latency_ms.{b}", latency.get(b), fmt_ms(latency.get(b))))
        if ratios:
            r = _ratio(latency.get(b), base_latency.get(b))
            out.append(cell(f"latency_ratio.{b}", r, fmt_ratio(r)))
    size = row.get("size_bytes")
    out.append(cell("size_bytes", size, DASH if size is None else format_bytes(size)))
    if ratios:
        r = _ratio(size, base.get("size_bytes"))
        out.append(cell("size_ratio", r, fmt_ratio(r)))
    return "".join(out)


def measure_heads(batches: list[str], ratios: bool = True) -> str:
    heads = ["metric", "drop"]
    for b in batches:
        heads += [f"ms @{b}"] + ([f"x base @{b}"] if ratios else [])
    heads += ["size"] + (["x base"] if ratios else [])
    return "".join(f"<th>{escape(h)}</th>" for h in heads)


def objective_value(c: dict, result: dict):
    """What the goal's objective ranks a candidate by (smaller is better): latency at the largest batch or size."""
    objective = (result.get("goal") or {}).get("objective", "latency")
    if objective in _OBJECTIVE_KEY:
        return c.get(_OBJECTIVE_KEY[objective])
    return (c.get("latency_ms") or {}).get(largest_batch(result))


def sorted_candidates(result: dict) -> list[dict]:
    """Candidates by objective, best first; those without a value (failed, pruned, not timed) last, by name."""
    def key(c):
        v = objective_value(c, result)
        return (v is None, v if v is not None else 0.0, str(c.get("name", "")))
    return sorted(result.get("candidates") or [], key=key)


def picked(result: dict) -> dict | None:
    """The chosen candidate, else the closest one (bound not met), else None."""
    pick = result.get("chosen") or result.get("closest")
    for c in [result.get("baseline") or {}] + list(result.get("candidates") or []):
        if pick is not None and c.get("id") == pick:
            return c
    return None


# ---- sections --------------------------------------------------------------------------------------------
def verdict_box(result: dict) -> str:
    goal, flags = result.get("goal") or {}, []
    pick = picked(result)
    if not result.get("bound_met", True):
        flags.append("bound not met; closest candidate: " + (pick.get("name", "?") if pick else "none"))
    if not result.get("speedup", True):
        flags.append(f"no speed-up on this runtime ({goal.get('runtime', '?')})")
    css = "verdict warn" if flags else "verdict"
    lines = "".join(f'<p class="flag">{escape(f)}</p>' for f in flags)
    return f'<div class="{css}" id="verdict">{lines}<p>{escape(str(result.get("verdict", "")))}</p></div>'


def plot_figure(result: dict) -> str:
    png = pareto_png(result)
    if png is None:
        return '<p id="plot-missing">The plots need matplotlib: pip install matplotlib</p>'
    return ('<figure id="plot"><img id="pareto" alt="metric vs latency and size; Pareto front" '
            f'src="data:image/png;base64,{png}"></figure>')


def steps_table(result: dict, batches: list[str]) -> str:
    base = result.get("baseline") or {}
    rows = "".join(f'<tr data-index="{i}">{text_cell("step", s.get("step"))}{text_cell("label", s.get("label"))}'
                   f"{measure_cells(s, base, batches)}</tr>" for i, s in enumerate(result.get("chosen_steps") or []))
    if not rows:
        return "<p>No recipe was replayed step by step.</p>"
    return (f'<table id="steps"><tr><th>step</th><th>label</th>{measure_heads(batches)}</tr>{rows}</table>')


def layers_table(pick: dict | None) -> str:
    layers = (pick or {}).get("layers") or []
    if not layers:
        return '<p id="no-layers">None: the recipe made no per-layer choices.</p>'
    rows = "".join(f"<tr>{text_cell('step', l.get('step'))}{text_cell('layer', l.get('layer'))}"
                   f"{text_cell('choice', l.get('choice'))}</tr>" for l in layers)
    return f'<table id="layers"><tr><th>step</th><th>layer</th><th>choice</th></tr>{rows}</table>'


def candidates_table(result: dict, batches: list[str]) -> str:
    base, pick = result.get("baseline") or {}, (picked(result) or {}).get("id")
    heads = ("<th>name</th><th>status</th><th>reason</th>" + measure_heads(batches, ratios=False)
             + "<th>container</th><th>MACs</th><th>meets bound</th><th>Pareto</th>")
    rows = []
    for c in sorted_candidates(result):
        css = ' class="chosen"' if c.get("id") == pick else ""
        container = c.get("container_bytes")
        rows.append(f'<tr data-id="{escape(str(c.get("id", "")))}"{css}>{text_cell("name", c.get("name"))}'
                    f'{text_cell("status", c.get("status"))}{text_cell("reason", c.get("reason"))}'
                    f"{measure_cells(c, base, batches, ratios=False)}"
                    f'{cell("container_bytes", container, DASH if container is None else format_bytes(container))}'
                    f'{cell("macs", c.get("macs"), fmt_count(c.get("macs")))}'
                    f'{cell("meets_bound", c.get("meets_bound"), _yes(c.get("meets_bound")))}'
                    f'{cell("pareto", c.get("pareto"), _yes(c.get("pareto")))}</tr>')
    return f'<table id="candidates"><tr>{heads}</tr>{"".join(rows)}</table>'


def peers_table(result: dict, batches: list[str]) -> str:
    peers, base = result.get("peers") or [], result.get("baseline") or {}
    if not peers:
        return '<p id="no-peers">No peers were measured.</p>'
    rows = "".join(f'<tr>{text_cell("name", p.get("name"))}{measure_cells(p, base, batches)}</tr>' for p in peers)
    return f'<table id="peers"><tr><th>name</th>{measure_heads(batches)}</tr>{rows}</table>'


def definition_list(items: dict, id_: str) -> str:
    body = "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(_plain(v))}</dd>" for k, v in items.items())
    return f'<dl id="{id_}">{body}</dl>'


def _plain(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return DASH if v is None else str(v)


def _yes(v) -> str:
    return DASH if v is None else ("yes" if v else "no")


def fmt_seconds(s) -> str:
    if s is None or not math.isfinite(s):
        return DASH
    minutes, seconds = divmod(int(round(s)), 60)
    return f"{s:.1f} s" + (f" ({minutes} min {seconds} s)" if minutes else "")


def render(result: dict) -> str:
    """The whole page: verdict, plots, chosen recipe step by step, per-layer choices, every candidate, peers,
    machine and versions, goal, search time and the exact command."""
    goal, machine, batches = result.get("goal") or {}, result.get("machine") or {}, _batches(result)
    pick = picked(result)
    title = f"smallify compress: {goal.get('metric', 'metric')} on {goal.get('runtime', '?')}"
    recipe_of = "chosen" if result.get("chosen") else "closest"
    seconds = result.get("search_seconds")
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>",
        verdict_box(result),
        plot_figure(result),
        f"<h2>The {recipe_of} recipe, step by step</h2>"
        + (f'<p id="chosen-name">{escape(str(pick.get("name", "")))}</p>' if pick else "<p>No candidate.</p>"),
        steps_table(result, batches),
        f"<h2>Per-layer choices of the {recipe_of} candidate</h2>", layers_table(pick),
        f"<h2>All candidates ({len(result.get('candidates') or [])}), best {escape(str(goal.get('objective', 'latency')))} first</h2>",
        candidates_table(result, batches),
        "<h2>Peers</h2>", peers_table(result, batches),
        "<h2>Machine</h2>", definition_list({"cpu": machine.get("cpu"), **(machine.get("versions") or {})}, "machine"),
        "<h2>Goal</h2>", definition_list(goal, "goal"),
        f'<h2>Search time</h2><p id="search-time" data-value="{escape(_raw(seconds))}">{escape(fmt_seconds(seconds))}</p>',
        "<h2>Command</h2>", f'<pre id="command">{escape(str(result.get("command", "")))}</pre>',
        f'<p>smallify {escape(str(result.get("smallify_version", "?")))}, {escape(str(result.get("created", "")))}</p>',
        "</body></html>\n",
    ]
    return "\n".join(parts)


def write_report(result: dict, path) -> Path:
    """Render ``result`` and write it to ``path`` atomically (its folder created when missing)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {path.parent} for the report: {e.strerror or e}") from None
    page = render(result)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def load_result(path) -> dict:
    """A compress result read from ``path`` (its result.json), checked for kind, version and required keys."""
    path = Path(path)
    accepted = f"accepted: the result.json that smallify compress writes (kind {KIND!r}, schema_version <= {SCHEMA_VERSION})"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"compress result {path} does not exist; {accepted}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read compress result {path} ({getattr(e, 'strerror', None) or e}); {accepted}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"compress result {path} is not valid JSON ({e.msg} at line {e.lineno}); {accepted}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise ModelError(f"compress result {path} has kind {kind!r}; {accepted}")
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise ModelError(f"compress result {path} has schema_version {version!r}, this smallify reads up to "
                         f"{SCHEMA_VERSION}: upgrade smallify; {accepted}")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise ModelError(f"compress result {path} lacks {', '.join(missing)}; {accepted}")
    return doc
