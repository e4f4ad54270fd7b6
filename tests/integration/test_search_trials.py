"""One trial per pod (the operator's search): trial n asks optuna with the finished trials as
history, prunes against them, records itself under trials/<n>/, and a replacement pod of a
finished trial reports the recorded result instead of training again."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from graft import search_plan as plan
from graft.api.search import SearchSpec
from graft_trainer.errors import EXIT_OK
from graft_trainer.search_trial import ask, grid_point, run_trial
from tests.integration.test_search import TRAINING, search_doc
from tests.integration.trainer_kit import shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


@pytest.fixture(scope="session")
def kit() -> dict[str, Path]:
    return shared_kit()


def record(out: Path, number: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "trials" / str(number) / "trial.json").read_text())
    return data


def test_trials_in_separate_runs_form_one_study(kit: dict[str, Path], tmp_path: Path) -> None:
    search = {
        "strategy": "random",
        "trials": 3,
        "space": {
            "training.learningRate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
            "lora.r": {"type": "choice", "values": [4, 8]},
        },
    }
    doc = search_doc(kit, "study", search)
    out = tmp_path / "job"
    results = []
    for number in range(3):
        code, message, result = run_trial(doc, f"file://{out}/", number)
        assert code == EXIT_OK, message
        results.append(result)
    assert [r["trial"] for r in results] == [0, 1, 2]
    assert all(r["state"] == "Complete" for r in results), results
    rates = {r["params"]["training.learningRate"] for r in results}
    assert len(rates) == 3  # every trial asked its own point
    for r in results:
        stored = record(out, r["trial"])
        assert stored["state"] == "Complete" and stored["value"] == pytest.approx(r["value"])
        assert r["adapter"] == f"file://{out}/trials/{r['trial']}/adapter/"
        assert (out / "trials" / str(r["trial"]) / "adapter" / "manifest.json").is_file()
    report = (out / "search" / "report.html").read_text()
    assert all(f"{r['value']:.4g}" in report for r in results), "the report misses a trial"

    # A replacement pod of a finished trial reports the record; it does not train again.
    adapter = out / "trials" / "1" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    code, message, again = run_trial(doc, f"file://{out}/", 1)
    assert code == EXIT_OK and "recorded before" in message
    assert again == results[1]
    assert adapter.stat().st_mtime_ns == before

    # The same job edited (`graft run` again after changing what is trained): the records of
    # the old spec are not this study's, so the trial trains again rather than report them.
    edited = copy.deepcopy(doc)
    edited["spec"]["training"]["maxSteps"] = TRAINING["maxSteps"] - 2
    code, message, fresh = run_trial(edited, f"file://{out}/", 1)
    assert code == EXIT_OK and "recorded before" not in message, message
    assert fresh["state"] == "Complete" and fresh["step"] == TRAINING["maxSteps"] - 2
    assert adapter.stat().st_mtime_ns != before


def test_a_divergent_trial_is_pruned_against_the_finished_ones(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    search = {
        "strategy": "grid",
        "trials": 2,
        "pruning": {"enabled": True, "rule": "median", "warmupSteps": 2},
        "space": {"training.learningRate": {"type": "choice", "values": [1e-2, 1.0]}},
    }
    doc = search_doc(kit, "prune", search, maxSteps=8)
    seed = doc["spec"]["training"].get("seed", 42)
    spec = SearchSpec.model_validate(search)
    points = {n: grid_point(spec, n, seed)["training.learningRate"] for n in range(2)}
    assert sorted(points.values()) == [1e-2, 1.0]  # the grid's two points, one each
    good = next(n for n, lr in points.items() if lr == 1e-2)
    bad = 1 - good
    out = tmp_path / "job"
    code, _, first = run_trial(doc, f"file://{out}/", good)
    assert code == EXIT_OK and first["state"] == "Complete", first
    code, _, second = run_trial(doc, f"file://{out}/", bad)
    assert code == EXIT_OK
    assert second["state"] == "Pruned", second
    assert second["step"] is not None and second["step"] < 8
    assert second["adapter"] is None
    assert record(out, bad)["intermediate"], "the pruned trial kept no intermediate values"


def test_random_trials_asked_at_the_same_time_differ() -> None:
    spec = SearchSpec.model_validate(
        {"space": {"training.learningRate": {"type": "float", "low": 1e-5, "high": 1e-2}}}
    )
    base: dict[str, Any] = {"search": spec.to_api()}
    asked = [ask([], base, spec, n, seed=42) for n in range(4)]
    assert len({a["training.learningRate"] for a in asked}) == 4
    assert ask([], base, spec, 2, seed=42) == asked[2]  # the same trial, the same point
    done = plan.StudyTrial(0, asked[0], state="Complete", value=0.5)
    assert ask([done], base, spec, 1, seed=42) != asked[0]
