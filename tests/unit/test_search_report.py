"""The search report: every trial in the table, inline SVG charts that parse, whatever the mix
of states, non-finite values and parameter kinds."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET

from graft.api.search import SearchSpec
from graft.search_plan import Study, StudyTrial
from graft_trainer.search_report import render_search_report

SPACE = SearchSpec.model_validate(
    {
        "strategy": "random",
        "trials": 5,
        "pruning": {"enabled": True, "warmupSteps": 2},
        "space": {
            "training.learningRate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
            "lora.r": {"type": "int", "low": 4, "high": 16},
            "method": {"type": "choice", "values": ["lora", "dora"]},
        },
    }
)


def _study() -> Study:
    p = [
        {"training.learningRate": 1e-3, "lora.r": 4, "method": "lora"},
        {"training.learningRate": 5e-2, "lora.r": 8, "method": "dora"},
        {"training.learningRate": 1e-4, "lora.r": 16, "method": "lora"},
        {"training.learningRate": 2e-2, "lora.r": 12, "method": "dora"},
        {"training.learningRate": 3e-3, "lora.r": 6, "method": "<b>x</b>"},
    ]
    return Study(
        fingerprint="x",
        trials=[
            StudyTrial(0, p[0], "Complete", value=0.4, intermediate={2: 0.6, 4: 0.4}, step=4),
            StudyTrial(1, p[1], "Pruned", intermediate={2: 9.0, 4: float("nan")}, step=4),
            StudyTrial(2, p[2], "Complete", value=0.3, intermediate={2: 0.5, 4: 0.3}, step=4),
            StudyTrial(3, p[3], "Failed", message="CUDA out of memory <oops>"),
            StudyTrial(4, p[4], "Running", intermediate={2: 0.7}, step=2),
        ],
    )


def test_report_lists_every_trial_and_its_charts_parse() -> None:
    page = render_search_report("tone", SPACE, _study(), 2)
    rows = re.findall(r"<tr[^>]*><td>(\d+)</td><td>(\w+)</td>", page)
    assert rows == [
        ("0", "Complete"),
        ("1", "Pruned"),
        ("2", "Complete"),
        ("3", "Failed"),
        ("4", "Running"),
    ]
    assert "best trial <b>2</b>" in page
    assert 'href="../trials/2/report.html"' in page  # the report sits in search/
    assert "&lt;oops&gt;" in page and "<oops>" not in page  # escaped
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 1 + len(SPACE.space) + 1  # per trial, per parameter, over steps
    for svg in svgs:
        ET.fromstring(svg)
    # the log-scale parameter gets decade-like tick labels, the category one its values
    ticks = [float(t) for t in re.findall(r'anchor="middle">([-\d.e+]+)<', svgs[1])]
    assert len(ticks) == 5 and all(b / a > 3 for a, b in itertools.pairwise(ticks))
    assert "dora" in svgs[3]


def test_report_without_values() -> None:
    study = Study(fingerprint="x", trials=[StudyTrial(0, {"lora.r": 4}, "Failed", message="no")])
    page = render_search_report("tone", SPACE, study, None)
    assert "no trial completed" in page
    assert "no values yet" in page and "no intermediate evaluations" in page
