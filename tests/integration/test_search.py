"""Hyper-parameter search with `graft run` on the tiny model (the operator's study plan, each
trial run as in its pod): random and grid studies complete with the best trial's adapter as
the job's, a divergent trial is pruned early, and a rerun resumes the study without rerunning
a finished trial."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from graft import search_plan as plan
from graft.api.search import SearchSpec, SearchStatus
from graft.storage import read_manifest
from graft_trainer.__main__ import run_resource as run_search
from graft_trainer.errors import EXIT_FAILURE, EXIT_OK
from graft_trainer.outcome import RunEnd
from graft_trainer.search_trial import grid_point
from tests.integration.trainer_kit import job_document, shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]

# A few seconds per trial: few steps on a small slice of the data.
TRAINING = {
    "maxSteps": 4,
    "evalSteps": 2,
    "loggingSteps": 2,
    "saveSteps": 1000,
    "perDeviceTrainBatchSize": 8,
    "learningRate": 1e-2,
}
DATASET = {"trainSplit": "train[:30%]", "evalSplit": "train[90%:]"}


@pytest.fixture(scope="session")
def kit() -> dict[str, Path]:
    return shared_kit()


def search_doc(kit: dict[str, Path], name: str, search: dict[str, Any], **training: Any) -> Any:
    doc = job_document(
        kit,
        name=name,
        training={**TRAINING, **training},
        dataset=DATASET,
        evaluation={"metrics": ["loss"]},
    )
    doc["spec"]["search"] = search
    return doc


def study_of(out: Path) -> plan.Study:
    """The study as the trial records under `out` show it (what both executors write)."""
    study = plan.Study(fingerprint="")
    for path in sorted((out / "trials").glob("*/trial.json"), key=lambda p: int(p.parent.name)):
        study.trials.append(plan.StudyTrial.from_json(json.loads(path.read_text())))
    return study


def check_published(out: Path, end: RunEnd, study: plan.Study) -> plan.StudyTrial:
    """The job's result is its best trial's, as the operator's status would say; returns it."""
    assert end.code == EXIT_OK, end.message
    done = [t for t in study.trials if t.state == "Complete"]
    assert done
    values = [t.value for t in done]
    assert all(v is not None and math.isfinite(v) for v in values)
    best = min(done, key=lambda t: (t.value, t.number))  # type: ignore[arg-type,return-value]
    assert end.search is not None
    status = SearchStatus.model_validate(end.search)
    assert status.best is not None and status.best.trial == best.number
    assert status.best.value == pytest.approx(best.value)
    assert status.completed == len(done) and len(status.trials) == len(study.trials)
    # the job's adapter is the best trial's own, with its manifest: the layout of a cluster
    # study, where nothing is copied to the job's prefix
    assert end.outcome is not None
    assert best.adapter is not None and best.adapter.endswith(f"/trials/{best.number}/adapter/")
    assert end.outcome.artifacts["adapter"] == best.adapter
    assert read_manifest(best.adapter) is not None
    assert read_manifest(f"file://{out}/") is None and not (out / "adapter").exists()
    trial_manifest = read_manifest(f"file://{out}/trials/{best.number}/")
    assert trial_manifest is not None and "search" not in trial_manifest["spec"]
    for path, value in best.params.items():  # the trial trained with its parameters
        node = trial_manifest["spec"]
        for part in path.split("."):
            node = node[part]
        assert node == value
    # the study report shows every trial, with inline SVG charts that parse
    assert end.outcome.artifacts["report"] == f"file://{out}/search/report.html"
    report = (out / "search" / "report.html").read_text()
    for t in study.trials:
        assert f"<tr><td>{t.number}</td>" in report or f"<td>{t.number}</td><td>{t.state}" in report
    svgs = [s.split("</svg>")[0] + "</svg>" for s in report.split("<svg")[1:]]
    assert len(svgs) == 2 + len(status.trials[0].params)
    for svg in svgs:
        ET.fromstring("<svg" + svg)
    return best


def test_random_search_of_six_trials(kit: dict[str, Path], tmp_path: Path) -> None:
    search = {
        "strategy": "random",
        "trials": 6,
        "parallelism": 1,
        "objective": {"metric": "eval_loss", "direction": "minimize"},
        "space": {
            "training.learningRate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
            "lora.r": {"type": "choice", "values": [4, 8]},
        },
    }
    out = tmp_path / "job"
    end = run_search(search_doc(kit, "rand", search), f"file://{out}/", "none")
    assert end.code == EXIT_OK, end.message
    assert "best trial" in end.message
    study = study_of(out)
    assert [t.number for t in study.trials] == list(range(6))
    assert all(t.state == "Complete" and t.step == 4 for t in study.trials)
    assert len({t.params["training.learningRate"] for t in study.trials}) == 6
    for t in study.trials:
        assert set(t.intermediate) == {2, 4}
        assert read_manifest(f"file://{out}/trials/{t.number}/") is not None
    check_published(out, end, study)


def test_grid_search_runs_each_point_once_two_at_a_time(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    search = {
        "strategy": "grid",
        "trials": 4,
        "parallelism": 2,
        "space": {
            "training.learningRate": {"type": "choice", "values": [1e-3, 2e-2]},
            "lora.r": {"type": "int", "low": 4, "high": 8, "step": 4},
        },
    }
    out = tmp_path / "job"
    end = run_search(search_doc(kit, "grid", search), f"file://{out}/", "none")
    assert end.code == EXIT_OK, end.message
    study = study_of(out)
    assert len(study.trials) == 4 and all(t.state == "Complete" for t in study.trials)
    points = {(t.params["training.learningRate"], t.params["lora.r"]) for t in study.trials}
    assert points == {(1e-3, 4), (1e-3, 8), (2e-2, 4), (2e-2, 8)}
    check_published(out, end, study)


def _seed_with_good_first(search: dict[str, Any]) -> int:
    """A training seed for which the grid's trial 0 takes the sane learning rate."""
    spec = SearchSpec.model_validate(search)
    for seed in range(50):
        if grid_point(spec, 0, seed)["training.learningRate"] < 1:
            return seed
    raise AssertionError("no seed puts the sane learning rate first")


def test_pruning_stops_a_divergent_trial_early(kit: dict[str, Path], tmp_path: Path) -> None:
    search = {
        "strategy": "grid",
        "trials": 2,
        "pruning": {"enabled": True, "rule": "median", "warmupSteps": 2},
        "space": {"training.learningRate": {"type": "choice", "values": [1e-2, 1.0]}},
    }
    seed = _seed_with_good_first(search)
    out = tmp_path / "job"
    doc = search_doc(kit, "prune", search, maxSteps=8, seed=seed)
    end = run_search(doc, f"file://{out}/", "none")
    assert end.code == EXIT_OK, end.message
    study = study_of(out)
    good, bad = study.trials
    assert good.params["training.learningRate"] == 1e-2 and good.state == "Complete"
    assert bad.params["training.learningRate"] == 1.0
    assert bad.state == "Pruned", bad
    assert bad.step is not None and bad.step < 8  # stopped before its last step
    assert bad.adapter is None
    assert read_manifest(f"file://{out}/trials/1/") is None  # a pruned trial publishes nothing
    best = check_published(out, end, study)
    assert best.number == 0
    assert "Pruned" in (out / "search" / "report.html").read_text()


def test_rerun_resumes_the_study(kit: dict[str, Path], tmp_path: Path) -> None:
    search: dict[str, Any] = {
        "strategy": "random",
        "trials": 2,
        "space": {"training.learningRate": {"type": "float", "low": 1e-3, "high": 3e-2}},
    }
    out = tmp_path / "job"
    uri = f"file://{out}/"
    end = run_search(search_doc(kit, "resume", search), uri, "none")
    assert end.code == EXIT_OK, end.message
    first = study_of(out)
    assert len(first.trials) == 2
    stamps = {n: (out / "trials" / str(n) / "manifest.json").stat().st_mtime_ns for n in (0, 1)}

    # the same job asked for more trials runs only the missing one
    search["trials"] = 3
    end = run_search(search_doc(kit, "resume", search), uri, "none")
    assert end.code == EXIT_OK, end.message
    second = study_of(out)
    assert [t.number for t in second.trials] == [0, 1, 2]
    assert [t.to_json() for t in second.trials[:2]] == [t.to_json() for t in first.trials]
    for n in (0, 1):  # not rerun: their outputs were not rewritten
        assert (out / "trials" / str(n) / "manifest.json").stat().st_mtime_ns == stamps[n]
    lrs = [t.params["training.learningRate"] for t in second.trials]
    assert len(set(lrs)) == 3
    check_published(out, end, second)

    # a crash while trial 2 ran: its record says Running; a rerun continues it with the same
    # parameters, as a replacement pod does
    record = out / "trials" / "2" / "trial.json"
    crashed = json.loads(record.read_text())
    crashed.update(state="Running", value=None, adapter=None, finished=None)
    record.write_text(json.dumps(crashed))
    (out / "trials" / "2" / "manifest.json").unlink()
    end = run_search(search_doc(kit, "resume", search), uri, "none")
    assert end.code == EXIT_OK, end.message
    third = study_of(out)
    assert [t.number for t in third.trials] == [0, 1, 2]
    assert third.trials[2].state == "Complete"
    assert third.trials[2].params == second.trials[2].params
    assert [t.to_json() for t in third.trials[:2]] == [t.to_json() for t in first.trials]
    check_published(out, end, third)

    # nothing left to do: a rerun only reports
    end = run_search(search_doc(kit, "resume", search), uri, "none")
    assert end.code == EXIT_OK, end.message
    assert [t.to_json() for t in study_of(out).trials] == [t.to_json() for t in third.trials]


def test_a_search_whose_every_trial_fails_fails_naming_the_cause(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    search = {"trials": 2, "space": {"lora.r": {"type": "choice", "values": [4, 8]}}}
    doc = search_doc(kit, "bad", search)
    doc["spec"]["dataset"]["uri"] = f"file://{tmp_path}/missing.jsonl"
    out = tmp_path / "job"
    end = run_search(doc, f"file://{out}/", "none")
    assert end.code == EXIT_FAILURE, end.message
    # the operator's wording for the same study (AllTrialsFailed), and the first trial's cause
    assert "no trial completed (0 complete, 0 pruned, 2 failed)" in end.message
    assert "missing.jsonl" in end.message, end.message
    assert [t.state for t in study_of(out).trials] == ["Failed", "Failed"]
    assert read_manifest(f"file://{out}/") is None
