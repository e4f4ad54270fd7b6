"""A searched FineTuneJob on a cluster: one Job per trial, at most `parallelism` at once, results
from the pods' termination messages, records sticky in status.search (restart-safe)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from graft.controller import planner
from graft.controller.config import OperatorConfig
from graft.controller.sources import gate
from graft.controller.status import Observed, StudyObserved, compute_status, find_condition
from graft.controller.study import TrialObserved, plan_records, plan_study

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
PREFIX = "s3://b/ns/finetunejobs/tune-abcd1234/"
SPEC: dict[str, Any] = {
    "model": {"uri": "s3://b/models/tiny/"},
    "dataset": {"uri": "s3://b/d.jsonl", "evalSplit": "train[90%:]", "textTemplate": "{t}"},
    "output": {"uri": "s3://b/"},
    "search": {
        "strategy": "random",
        "trials": 4,
        "parallelism": 2,
        "objective": {"metric": "eval_loss", "direction": "minimize"},
        "space": {"training.learningRate": {"type": "float", "low": 1e-4, "high": 1e-2}},
    },
}


def trial(number: int, phase: str = "Running", **report: Any) -> TrialObserved:
    pod: dict[str, Any] = {
        "metadata": {"name": f"tune-trial-{number}-x", "creationTimestamp": "t"},
        "status": {"phase": phase},
    }
    if phase == "Succeeded":
        outcome = {
            "kind": "FineTuneJob",
            "state": "Succeeded",
            "trial": {"trial": number, **report},
        }
        message = json.dumps(outcome)
        pod["status"]["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": message}}}
        ]
    job = {"metadata": {"name": f"tune-trial-{number}", "uid": f"j{number}", "labels": {}}}
    return TrialObserved(number, job, (pod,))


def done(number: int, value: float, state: str = "Complete") -> TrialObserved:
    return trial(
        number,
        "Succeeded",
        state=state,
        value=value if state == "Complete" else None,
        step=10,
        params={"training.learningRate": 1e-3 * (number + 1)},
        adapter=f"{PREFIX}trials/{number}/adapter/" if state == "Complete" else None,
    )


def test_launches_lowest_trials_up_to_parallelism() -> None:
    plan = plan_study(SPEC, PREFIX, None, [], backoff_limit=1, job_name="tune")
    assert plan.launch == [0, 1] and plan.outcome == "running"
    plan = plan_study(SPEC, PREFIX, None, [trial(0), trial(1)], 1, "tune")
    assert plan.launch == []  # two running: parallelism reached
    plan = plan_study(SPEC, PREFIX, None, [done(0, 0.5), trial(1)], 1, "tune")
    assert plan.launch == [2]
    assert plan.search["completed"] == 1 and plan.search["running"] == 2
    assert plan.progress == {"step": 1, "totalSteps": 4, "percent": 25}


def test_finished_records_are_sticky_and_never_relaunched() -> None:
    first = plan_study(SPEC, PREFIX, None, [done(0, 0.5), done(1, 0.4)], 1, "tune")
    assert first.launch == [2, 3]
    # After a restart the trial Jobs 0 and 1 are gone (say, deleted by hand): the records in
    # status keep them finished; 2 and 3 exist and run; nothing is launched twice.
    again = plan_study(SPEC, PREFIX, first.search, [trial(2), trial(3)], 1, "tune")
    assert again.launch == []
    states = {t["number"]: t["state"] for t in again.search["trials"]}
    assert states == {0: "Complete", 1: "Complete", 2: "Running", 3: "Running"}


def test_best_trial_wins_and_its_adapter_is_the_jobs() -> None:
    trials = [done(0, 0.5), done(1, 0.3), done(2, 0.9, "Pruned"), done(3, 0.4)]
    plan = plan_study(SPEC, PREFIX, None, trials, 1, "tune")
    assert plan.outcome == "succeeded"
    assert plan.search["best"]["trial"] == 1 and plan.search["best"]["value"] == 0.3
    assert (plan.search["completed"], plan.search["pruned"]) == (3, 1)
    assert plan.artifacts is not None
    assert plan.artifacts["adapter"] == f"{PREFIX}trials/1/adapter/"
    maximize = {
        **SPEC,
        "search": {**SPEC["search"], "objective": {"metric": "accuracy", "direction": "maximize"}},
    }
    plan = plan_study(maximize, PREFIX, None, trials, 1, "tune")
    assert plan.search["best"]["trial"] == 0


def test_failed_trials_count_and_a_study_without_a_completed_trial_fails() -> None:
    crashed = trial(0, "Failed")
    crashed.pods[0]["status"]["containerStatuses"] = [
        {"name": "trainer", "state": {"terminated": {"exitCode": 1, "message": "boom"}}}
    ]
    silent = trial(1, "Succeeded")  # a pod that reported nothing usable
    silent.pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "?"
    plan = plan_study(
        SPEC, PREFIX, None, [crashed, silent, done(2, 1, "Pruned"), done(3, 1, "Failed")], 0, "tune"
    )
    assert plan.outcome == "failed" and plan.search["failed"] == 3
    assert "no trial completed" in plan.message
    # the message names the first failed trial's cause, so `kubectl describe` says why
    assert "; trial 0: " in plan.message and "boom" in plan.message, plan.message


def test_compute_status_drives_conditions_and_trial_jobs() -> None:
    obj = {
        "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": SPEC,
    }
    observed = Observed(launched_hash=None, current_hash="h", study=StudyObserved(SPEC, PREFIX))
    plan = compute_status(obj, observed, NOW)
    assert plan.create_trials == [0, 1] and not plan.create_job
    running = find_condition(plan.status["conditions"], "Running")
    assert running is not None and running["reason"] == "TrialsRunning"
    obj["status"] = plan.status
    trials = (done(0, 0.5), done(1, 0.3), done(2, 0.6), done(3, 0.7))
    observed = Observed(
        launched_hash="h", current_hash="h", study=StudyObserved(SPEC, PREFIX, trials)
    )
    plan = compute_status(obj, observed, NOW)
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["artifacts"]["adapter"] == f"{PREFIX}trials/1/adapter/"
    succeeded = find_condition(plan.status["conditions"], "Succeeded")
    assert succeeded is not None and "best trial 1: eval_loss 0.3" in succeeded["message"]


def test_trial_job_runs_one_trial_without_writing_the_resource_status() -> None:
    obj = {"kind": "FineTuneJob", "metadata": {"name": "tune", "namespace": "ns", "uid": "u-1"}}
    job = planner.build_trainer_job(obj, SPEC, OperatorConfig(), spec_hash_="h", trial=3)
    assert job["metadata"]["name"] == "tune-trial-3"
    assert job["metadata"]["labels"]["graft.dev/trial"] == "3"
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GRAFT_TRIAL"] == "3" and env["GRAFT_REPORTER"] == "jsonl"
    assert env["GRAFT_ARTIFACTS_URI"] == "s3://b/ns/finetunejobs/tune-u1/"


def test_a_reference_to_a_searched_job_uses_the_best_trial() -> None:
    status = {
        "conditions": [{"type": "Succeeded", "status": "True"}],
        "search": {"best": {"trial": 2, "params": {"training.learningRate": 0.005}, "value": 0.3}},
    }
    ftj = {"metadata": {"name": "tune", "uid": "abcd1234-x"}, "spec": SPEC, "status": status}
    spec = {"source": {"fineTuneJobRef": {"name": "tune"}}}
    g = gate("OptimizeJob", "ns", spec, {"tune": ftj}, OperatorConfig())
    assert g.state == "ready", g.message
    assert g.references["tune"]["uri"] == "s3://b/ns/finetunejobs/tune-abcd1234/trials/2/"
    ran = g.references["tune"]["spec"]
    assert ran["training"]["learningRate"] == 0.005 and "search" not in ran


def test_what_trial_pods_show_wins_over_records_written_into_status() -> None:
    honest = plan_study(SPEC, PREFIX, None, [done(0, 0.5), done(1, 0.4)], 1, "tune")
    forged = json.loads(json.dumps(honest.search))
    for record in forged["trials"]:
        if record["number"] == 0:  # someone claims trial 0 did far better than its pod says
            record["value"] = 0.001
    again = plan_study(SPEC, PREFIX, forged, [done(0, 0.5), done(1, 0.4)], 1, "tune")
    values = {t["number"]: t.get("value") for t in again.search["trials"]}
    assert values[0] == 0.5 and again.search["best"]["trial"] == 1


def test_a_trial_pod_without_the_contracts_outcome_is_a_failed_trial() -> None:
    pod: dict[str, Any] = {
        "metadata": {"name": "tune-trial-0-x"},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": 0, "message": '{"trial": 0}'}},
                }
            ],
        },
    }
    job = {"metadata": {"name": "tune-trial-0", "uid": "j0", "labels": {}}}
    plan = plan_study(SPEC, PREFIX, None, [TrialObserved(0, job, (pod,))], 1, "tune")
    record = next(t for t in plan.search["trials"] if t["number"] == 0)
    assert record["state"] == "Failed"


def test_a_finished_record_in_status_counts_only_for_a_trial_whose_pods_are_gone() -> None:
    """Status holds finished records for good (a trial's Job and pods may go), but what a
    trial's pods show wins: a Complete record written over a running trial, or records
    numbered outside the study, decide nothing."""
    forged = {
        "trials": [
            {"number": 1, "state": "Complete", "value": 0.001, "params": {}, "adapter": "x"},
            {"number": 7, "state": "Complete", "value": 0.0001, "params": {}},
        ]
    }
    plan = plan_study(SPEC, PREFIX, forged, [done(0, 0.5), trial(1, "Running")], 1, "tune")
    states = {t["number"]: t["state"] for t in plan.search["trials"]}
    assert states == {0: "Complete", 1: "Running", 2: "Pending"}, states
    assert plan.search["best"]["trial"] == 0 and plan.outcome == "running"
    assert plan.launch == [2]  # trial 1 still takes one of the two places
    # the same record for a trial whose Job's pods are gone is the operator's memory: kept
    gone = TrialObserved(1, trial(1).job, ())
    kept = plan_study(SPEC, PREFIX, forged, [done(0, 0.5), gone], 1, "tune")
    assert {t["number"]: t["state"] for t in kept.search["trials"]}[1] == "Complete"
    assert 7 not in {t["number"] for t in kept.search["trials"]}


def test_the_plan_counts_the_trial_pods_it_was_given() -> None:
    """status.attempts counts every trial pod seen: the plan comes out with it, whoever plans
    (the operator from its trial Jobs, `graft run` with no pods)."""
    retried = trial(1)
    lost = {"metadata": {"name": "tune-trial-1-a"}, "status": {"phase": "Failed"}}
    retried = TrialObserved(1, retried.job, (lost, *retried.pods))
    assert plan_study(SPEC, PREFIX, None, [done(0, 0.5), retried], 1, "tune").pods == 3
    records = {0: {"number": 0, "state": "Running"}}
    assert plan_records(SPEC, PREFIX, records, "tune", pods=2).pods == 2
    assert plan_records(SPEC, PREFIX, records, "tune").pods == 0
