"""graft.search_plan: trial specs by dotted path, samplers and pruners, the trials' JSON records
(round trip, resume without reruns or duplicates, which spec they belong to) and the status
summary."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from typing import Any

import optuna
import pytest

from graft import search_plan as plan
from graft.api.search import SearchSpec, SearchStatus

BASE: dict[str, Any] = {
    "model": {"uri": "s3://b/models/tiny/"},
    "dataset": {"uri": "s3://b/data.jsonl", "evalSplit": "train[90%:]", "textTemplate": "{x}"},
    "method": "lora",
    "training": {"maxSteps": 10, "learningRate": 1e-3},
    "evaluation": {"metrics": ["loss"]},
    "search": {
        "strategy": "random",
        "trials": 6,
        "space": {"training.learningRate": {"type": "float", "low": 1e-5, "high": 1e-2}},
    },
}


def search(**kw: Any) -> SearchSpec:
    body: dict[str, Any] = {
        "space": {
            "training.learningRate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
            "lora.r": {"type": "int", "low": 4, "high": 32, "step": 4},
            "training.perDeviceTrainBatchSize": {"type": "choice", "values": [4, 8, 16]},
        }
    }
    body.update(kw)
    return SearchSpec.model_validate(body)


def grid() -> SearchSpec:
    return SearchSpec.model_validate(
        {
            "strategy": "grid",
            "trials": 4,
            "space": {
                "training.learningRate": {"type": "choice", "values": [1e-3, 1e-2]},
                "lora.r": {"type": "int", "low": 4, "high": 8, "step": 4},
            },
        }
    )


def objective(params: dict[str, Any]) -> float:
    return abs(math.log10(params["training.learningRate"]) + 3) + params.get("lora.r", 0) / 100


def run_trials(study: plan.Study, spec: SearchSpec, n: int, prefix: str = "file:///out/") -> Any:
    """Ask and tell `n` new trials against the rebuilt study, each kept as the record a trial
    writes (run_trial's loop, no training)."""
    ostudy = plan.rebuild_study(study, spec)
    for _ in range(n):
        trial = ostudy.ask()
        params = plan.suggest(trial, spec)
        value = objective(params)
        trial.report(value + 1, 5)
        ostudy.tell(trial, value)
        frozen = ostudy.trials[trial.number]
        study.trials.append(
            plan.StudyTrial(
                number=trial.number,
                params=params,
                state="Complete",
                value=value,
                intermediate={5: value + 1},
                step=5,
                uri=plan.trial_uri(prefix, trial.number),
                system_attrs=dict(frozen.system_attrs),
            )
        )
    return ostudy


def records_round_trip(study: plan.Study) -> plan.Study:
    """The study as read back from its trials' JSON records."""
    again = plan.Study(fingerprint=study.fingerprint, direction=study.direction)
    again.trials = [
        plan.StudyTrial.from_json(json.loads(json.dumps(t.to_json()))) for t in study.trials
    ]
    return again


# ---------------------------------------------------------------- trial specs


def test_trial_spec_sets_dotted_paths_and_drops_search() -> None:
    spec = plan.trial_spec(BASE, {"training.learningRate": 0.5, "lora.r": 16, "method": "dora"})
    assert "search" not in spec
    assert spec["training"] == {"maxSteps": 10, "learningRate": 0.5}
    assert spec["lora"] == {"r": 16}  # created where the base had none
    assert spec["method"] == "dora"
    assert BASE["training"]["learningRate"] == 1e-3 and "lora" not in BASE  # base untouched
    # the result is a valid spec
    from graft.api.finetune import FineTuneJobSpec

    FineTuneJobSpec.model_validate(spec)


def test_trial_spec_output_and_generated_objective() -> None:
    base = {
        **BASE,
        "output": {"uri": "s3://b/out/", "credentialsSecret": "s3"},
        "evaluation": {"metrics": ["loss"], "labelField": "tone"},
        "search": {**BASE["search"], "objective": {"metric": "accuracy", "direction": "maximize"}},
    }
    spec = plan.trial_spec(base, {}, output_uri="s3://b/out/job/trials/3/")
    assert spec["output"] == {"uri": "s3://b/out/job/trials/3/", "credentialsSecret": "s3"}
    assert spec["evaluation"]["metrics"] == ["loss", "accuracy"]
    assert base["evaluation"]["metrics"] == ["loss"]


def test_locations() -> None:
    assert plan.trial_uri("s3://b/p/", 3) == "s3://b/p/trials/3/"
    assert plan.trial_uri("file:///x/p", 0) == "file:///x/p/trials/0/"
    assert plan.report_uri("s3://b/p/") == "s3://b/p/search/report.html"


# ---------------------------------------------------------------- samplers and pruners


def test_sampler_and_pruner_per_strategy() -> None:
    assert isinstance(
        plan.make_sampler(search(strategy="random"), 1), optuna.samplers.RandomSampler
    )
    assert isinstance(plan.make_sampler(search(strategy="tpe")), optuna.samplers.TPESampler)
    assert isinstance(plan.make_sampler(grid()), optuna.samplers.GridSampler)
    assert isinstance(plan.make_pruner(search()), optuna.pruners.NopPruner)
    median = plan.make_pruner(search(pruning={"enabled": True, "warmupSteps": 7}))
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert median._n_warmup_steps == 7
    sha = plan.make_pruner(
        search(pruning={"enabled": True, "rule": "successive_halving", "warmupSteps": 5})
    )
    assert isinstance(sha, optuna.pruners.SuccessiveHalvingPruner)
    assert sha._min_resource == 5


def test_random_params_stay_in_their_ranges() -> None:
    spec = search(trials=20)
    study = plan.Study(fingerprint="x")
    run_trials(study, spec, 20)
    for t in study.trials:
        lr, r, bs = (t.params[k] for k in spec.space)
        assert 1e-5 <= lr <= 1e-2 and isinstance(lr, float)
        assert r in range(4, 33, 4) and isinstance(r, int)
        assert bs in (4, 8, 16)
    assert len({t.params["training.learningRate"] for t in study.trials}) == 20


def test_grid_visits_every_combination_once() -> None:
    spec = grid()
    assert plan.target_trials(spec) == 4
    study = plan.Study(fingerprint="x")
    run_trials(study, spec, 4)
    seen = sorted((t.params["training.learningRate"], t.params["lora.r"]) for t in study.trials)
    assert seen == sorted(itertools.product([1e-3, 1e-2], [4, 8]))


def test_grid_target_is_the_grid_when_trials_is_larger() -> None:
    spec = SearchSpec.model_validate({**grid().to_api(), "trials": 10})
    assert plan.target_trials(spec) == 4


# ---------------------------------------------------------------- records and resume


def test_records_round_trip_through_json() -> None:
    spec = grid()
    study = plan.Study(fingerprint="abc")
    run_trials(study, spec, 2)
    again = records_round_trip(study)
    assert [t.to_json() for t in again.trials] == [t.to_json() for t in study.trials]
    assert [t.number for t in again.trials] == [0, 1]
    assert again.trials[0].intermediate == {5: study.trials[0].value + 1}  # type: ignore[operator]
    assert again.trials[0].system_attrs["grid_id"] in range(4)


@pytest.mark.parametrize("make", [grid, lambda: search(trials=6)])
def test_resume_neither_reruns_nor_duplicates(make: Any) -> None:
    spec = make()
    study = plan.Study(fingerprint="abc")
    run_trials(study, spec, 2)
    first = [dict(t.params) for t in study.trials]
    resumed = records_round_trip(study)
    ostudy = run_trials(resumed, spec, 2)
    assert [t.number for t in resumed.trials] == [0, 1, 2, 3]
    assert [t.params for t in resumed.trials[:2]] == first  # finished trials kept as they were
    assert len(ostudy.trials) == 4
    keys = [json.dumps(t.params, sort_keys=True) for t in resumed.trials]
    assert len(set(keys)) == 4  # no point proposed twice


def test_a_trial_running_at_the_crash_is_continued_with_its_parameters() -> None:
    spec = search(trials=6)
    study = plan.Study(fingerprint="abc")
    run_trials(study, spec, 1)
    running = plan.StudyTrial(number=1, params={}, state="Running", intermediate={2: 3.0})
    ostudy = plan.rebuild_study(study, spec)
    running.params = plan.suggest(ostudy.ask(), spec)
    # the process dies here; a new one reads the records back
    resumed = records_round_trip(plan.Study(fingerprint="abc", trials=[*study.trials, running]))
    ostudy = plan.rebuild_study(resumed, spec)
    handles = plan.running_trials(ostudy)
    assert [h.number for h in handles] == [1]
    assert plan.suggest(handles[0], spec) == running.params  # same point, read back
    ostudy.tell(handles[0], 0.25)
    assert ostudy.best_trial.number == 1 and ostudy.best_trial.intermediate_values == {2: 3.0}


def test_pruner_sees_rebuilt_intermediate_values() -> None:
    spec = search(trials=10, pruning={"enabled": True, "warmupSteps": 1})
    study = plan.Study(fingerprint="x")
    run_trials(study, spec, 2)  # each reported (value + 1) at step 5
    ostudy = plan.rebuild_study(records_round_trip(study), spec)
    bad = ostudy.ask()
    plan.suggest(bad, spec)
    bad.report(1e6, 5)
    assert bad.should_prune()
    good = ostudy.ask()
    plan.suggest(good, spec)
    good.report(-1.0, 5)
    assert not good.should_prune()


def test_a_record_belongs_to_the_study_of_the_same_spec_only() -> None:
    """The fingerprint a trial's record carries: more trials or parallelism extend a study;
    any change to what is trained starts a new one."""
    same = plan.study_fingerprint(BASE)
    more = {**BASE, "search": {**BASE["search"], "trials": 9, "parallelism": 3}}
    assert plan.study_fingerprint(more) == same
    other = {**BASE, "training": {**BASE["training"], "maxSteps": 99}}
    assert plan.study_fingerprint(other) != same
    wider = {**BASE, "search": {**BASE["search"], "strategy": "grid"}}
    assert plan.study_fingerprint(wider) != same
    record = plan.StudyTrial(number=0, params={}, study=same)
    assert plan.StudyTrial.from_json(record.to_json()).study == same


def test_non_finite_values_never_reach_the_json() -> None:
    record = plan.StudyTrial(
        number=0, params={}, state="Pruned", intermediate={2: 1.0, 4: float("nan")}, step=4
    )
    record.value = float("inf")
    data = json.loads(json.dumps(record.to_json(), allow_nan=False))
    assert data["intermediate"] == {"2": 1.0}
    assert data["value"] is None and data["step"] == 4


# ---------------------------------------------------------------- status summary


def _study(direction: str = "minimize") -> plan.Study:
    mk = plan.StudyTrial
    return plan.Study(
        fingerprint="x",
        direction=direction,  # type: ignore[arg-type]
        trials=[
            mk(0, {"lora.r": 4}, "Complete", value=0.5, step=10, adapter="s3://b/t/0/adapter/"),
            mk(1, {"lora.r": 8}, "Pruned", intermediate={4: 9.0}, step=4),
            mk(2, {"lora.r": 16}, "Complete", value=0.3, step=10, adapter="s3://b/t/2/adapter/"),
            mk(3, {"lora.r": 32}, "Failed", message="boom"),
            mk(4, {"lora.r": 12}, "Complete", value=0.3, step=10),
            mk(5, {"lora.r": 6}, "Running", step=2),
        ],
    )


def test_summary_counts_and_best() -> None:
    status = plan.summary(_study())
    assert (status.completed, status.running, status.pruned, status.failed) == (3, 1, 1, 1)
    assert status.best is not None
    assert (status.best.trial, status.best.value, status.best.params) == (2, 0.3, {"lora.r": 16})
    assert [t.state for t in status.trials] == [
        "Complete",
        "Pruned",
        "Complete",
        "Failed",
        "Complete",
        "Running",
    ]
    assert status.trials[2].adapter == "s3://b/t/2/adapter/"
    # the summary is the API's status model, and its camelCase survives a round trip
    assert SearchStatus.model_validate(status.to_api()) == status
    maximize = plan.summary(_study("maximize"))
    assert maximize.best is not None and maximize.best.trial == 0


def test_summary_of_an_empty_or_failed_study() -> None:
    assert plan.summary(plan.Study(fingerprint="x")).best is None
    only_failed = plan.Study(
        fingerprint="x", trials=[plan.StudyTrial(0, {}, "Complete", value=float("nan"))]
    )
    assert plan.best_trial(only_failed) is None
    named = plan.summary(_study(), job_name="tone")
    assert named.trials[0].job_name == "tone-trial-0"


def test_operator_side_import_loads_neither_optuna_nor_torch() -> None:
    code = (
        "import sys, graft.search_plan as p\n"
        "p.summary(p.Study(fingerprint='x'))\n"
        "print(','.join(m for m in ('optuna', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
