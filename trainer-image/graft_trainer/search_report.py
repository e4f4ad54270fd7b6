"""The search report: one self-contained HTML page with every trial, the objective per trial,
per parameter and over steps, as inline SVG (no plotting library)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

from graft.api.search import SearchSpec
from graft.search_plan import Study, StudyTrial, best_trial

W, H = 420, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 14, 40
COLORS = {"Complete": "#1f77b4", "Pruned": "#999999", "Failed": "#d62728", "Running": "#ff7f0e"}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


class Axis:
    """Maps data to pixels: linear, log, or category positions."""

    def __init__(self, values: Sequence[Any], lo_px: float, hi_px: float, log: bool = False):
        self.lo_px, self.hi_px = lo_px, hi_px
        numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        self.categories: list[Any] | None = None
        if len(numeric) != len(values):
            self.categories = list(dict.fromkeys(json.dumps(v) for v in values))
            self.lo, self.hi, self.log = -0.5, len(self.categories) - 0.5, False
            return
        self.integers = all(isinstance(v, int) for v in numeric)
        self.log = log and all(v > 0 for v in numeric)
        data = [math.log10(v) for v in numeric] if self.log else [float(v) for v in numeric]
        self.lo, self.hi = (min(data), max(data)) if data else (0.0, 1.0)
        if self.hi - self.lo < 1e-12:
            self.lo, self.hi = self.lo - 0.5, self.hi + 0.5
        pad = (self.hi - self.lo) * 0.05
        self.lo, self.hi = self.lo - pad, self.hi + pad

    def __call__(self, value: Any) -> float:
        if self.categories is not None:
            x = float(self.categories.index(json.dumps(value)))
        else:
            x = math.log10(value) if self.log else float(value)
        return self.lo_px + (x - self.lo) / (self.hi - self.lo) * (self.hi_px - self.lo_px)

    def ticks(self) -> list[tuple[float, str]]:
        if self.categories is not None:
            return [(self(json.loads(c)), _fmt(json.loads(c))) for c in self.categories]
        out = []
        if self.integers and not self.log:
            first, last = math.ceil(self.lo), math.floor(self.hi)
            every = max(1, math.ceil((last - first + 1) / 8))
            return [(self(v), str(v)) for v in range(first, last + 1, every)]
        for t in _ticks(self.lo, self.hi):
            label = f"{10**t:.2g}" if self.log else f"{t:.3g}"
            out.append(
                (
                    self.lo_px + (t - self.lo) / (self.hi - self.lo) * (self.hi_px - self.lo_px),
                    label,
                )
            )
        return out


def _frame(x: Axis, y: Axis, x_label: str, y_label: str, body: list[str]) -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="10">',
        f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
        'fill="none" stroke="#ccc"/>',
    ]
    for px, label in x.ticks():
        parts.append(
            f'<text x="{px:.1f}" y="{H - BOTTOM + 13}" text-anchor="middle">{label}</text>'
        )
    for py, label in y.ticks():
        parts.append(f'<text x="{LEFT - 4}" y="{py + 3:.1f}" text-anchor="end">{label}</text>')
        parts.append(
            f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>'
        )
    parts.append(
        f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">'
        f"{html.escape(x_label)}</text>"
    )
    parts.append(
        f'<text x="12" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(TOP + H - BOTTOM) / 2})">{html.escape(y_label)}</text>'
    )
    return "".join(parts + body + ["</svg>"])


def _shown_value(t: StudyTrial) -> float | None:
    """A trial's point: its objective, or the last value a pruned trial reported."""
    if _finite(t.value):
        return t.value
    reported = t.reported
    return reported if t.state == "Pruned" and _finite(reported) else None


def _marker(px: float, py: float, t: StudyTrial, best: bool) -> str:
    color = COLORS.get(t.state, "#333")
    title = f"<title>trial {t.number} ({t.state}): {_fmt(_shown_value(t))}</title>"
    if best:
        return (
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="6" fill="#2ca02c" stroke="#000">'
            f"{title}</circle>"
        )
    fill = "none" if t.state == "Pruned" else color
    return (
        f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{fill}" stroke="{color}">{title}</circle>'
    )


def scatter(
    trials: list[StudyTrial],
    xs: list[Any],
    x_label: str,
    metric: str,
    best: int | None,
    log_x: bool,
) -> str:
    points = [(t, x, _shown_value(t)) for t, x in zip(trials, xs, strict=True)]
    points = [(t, x, v) for t, x, v in points if v is not None]
    if not points:
        return "<p>no values yet</p>"
    x = Axis([p[1] for p in points], LEFT, W - RIGHT, log=log_x)
    y = Axis([p[2] for p in points], H - BOTTOM, TOP)
    body = [_marker(x(px), y(py), t, t.number == best) for t, px, py in points]
    return _frame(x, y, x_label, metric, body)


def curves(trials: list[StudyTrial], metric: str, best: int | None) -> str:
    steps = [s for t in trials for s, v in t.intermediate.items() if math.isfinite(v)]
    values = [v for t in trials for v in t.intermediate.values() if math.isfinite(v)]
    if not values:
        return "<p>no intermediate evaluations</p>"
    x = Axis(steps, LEFT, W - RIGHT)
    y = Axis(values, H - BOTTOM, TOP)
    body = []
    for t in trials:
        pts = [(s, v) for s, v in sorted(t.intermediate.items()) if math.isfinite(v)]
        if not pts:
            continue
        color = "#2ca02c" if t.number == best else COLORS.get(t.state, "#333")
        dash = ' stroke-dasharray="4 3"' if t.state == "Pruned" else ""
        path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
        body.append(
            f'<polyline points="{path}" fill="none" stroke="{color}"{dash}>'
            f"<title>trial {t.number} ({t.state})</title></polyline>"
        )
        body += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2" fill="{color}"/>' for s, v in pts]
    return _frame(x, y, "step", metric, body)


def render_search_report(name: str, search: SearchSpec, study: Study, best: int | None) -> str:
    trials = sorted(study.trials, key=lambda t: t.number)
    chosen = best_trial(study)
    best = chosen.number if chosen is not None else best
    metric = f"{search.objective.metric} ({search.objective.direction})"
    paths = list(search.space)
    charts = [
        "<figure>"
        + scatter(trials, [t.number for t in trials], "trial", metric, best, False)
        + "<figcaption>objective per trial</figcaption></figure>"
    ]
    for path in paths:
        usable = [t for t in trials if path in t.params]
        charts.append(
            "<figure>"
            + scatter(
                usable,
                [t.params[path] for t in usable],
                path,
                metric,
                best,
                search.space[path].log,
            )
            + f"<figcaption>objective by {html.escape(path)}</figcaption></figure>"
        )
    charts.append(
        "<figure>"
        + curves(trials, search.objective.metric, best)
        + "<figcaption>intermediate evaluations (dashed: pruned)</figcaption></figure>"
    )
    head = "".join(f"<th>{html.escape(p)}</th>" for p in paths)
    rows = []
    for t in trials:
        cells = "".join(f"<td>{_fmt(t.params.get(p))}</td>" for p in paths)
        link = (
            f'<a href="../trials/{t.number}/report.html">report</a>'
            if t.state == "Complete"
            else ""
        )
        style = ' style="background:#e8f5e9;font-weight:bold"' if t.number == best else ""
        rows.append(
            f"<tr{style}><td>{t.number}</td><td>{t.state}</td><td>{_fmt(t.value)}</td>"
            f"<td>{_fmt(t.step)}</td>{cells}<td>{_fmt(t.message or '')}</td><td>{link}</td></tr>"
        )
    counts = {s: study.count(s) for s in ("Complete", "Pruned", "Failed", "Running")}
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    if chosen is not None:
        best_line = (
            f"best trial <b>{chosen.number}</b>: {html.escape(search.objective.metric)} "
            f"<b>{_fmt(chosen.value)}</b> with "
            f"{html.escape(json.dumps(chosen.params))}; its adapter is the job's adapter "
            f'(<a href="../trials/{chosen.number}/report.html">its report</a>).'
        )
    else:
        best_line = "no trial completed."
    pruning = (
        f"pruning {search.pruning.rule} after step {search.pruning.warmup_steps}"
        if search.pruning.enabled
        else "no pruning"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Graft search: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
figure{{display:inline-block;margin:.5em}}figcaption{{text-align:center;font-size:90%}}</style>
</head><body>
<h1>FineTuneJob {html.escape(name)}: hyper-parameter search</h1>
<p>{html.escape(search.strategy)} search, {len(trials)} trials ({summary}), objective
{html.escape(metric)}, {html.escape(pruning)}.</p>
<p>{best_line}</p>
<h2>Objective</h2>
<p>Filled: complete; hollow grey: pruned (at its last reported value); green: best.</p>
{"".join(charts)}
<h2>Trials</h2>
<table><tr><th>trial</th><th>state</th><th>value</th><th>step</th>{head}<th>note</th><th></th></tr>
{"".join(rows)}</table>
<h2>Search</h2><pre>{html.escape(json.dumps(search.to_api(), indent=2))}</pre>
</body></html>
"""
