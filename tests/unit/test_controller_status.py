"""Pure status computation: conditions, phase, actions from the resource, Job and pods."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from graft.api.errors import FieldIssue
from graft.controller.status import (
    Observed,
    StudyObserved,
    classify_pod,
    compute_status,
    derive_phase,
    find_condition,
    set_condition,
    status_patch,
)
from graft.controller.study import TrialObserved

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def ftj(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "a", "namespace": "n", "uid": "u1", "generation": 3},
        "spec": {"backoffLimit": 1, **spec},
    }
    if status is not None:
        obj["status"] = status
    return obj


def job(*conditions: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "a-train",
            "uid": "j1",
            "annotations": {"graft.dev/attempts-before": "0", "graft.dev/spec-hash": "h"},
        },
        "status": {
            "startTime": "2026-01-01T11:00:00Z",
            "conditions": [
                {"type": c, "status": "True", "reason": r}
                for c, r in (x.split(":") if ":" in x else (x, x) for x in conditions)
            ],
            **status,
        },
    }


def pod(name: str, phase: str, **extra: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    terminated = extra.pop("terminated", None)
    if terminated is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    status.update(extra)
    return {"metadata": {"name": name, "creationTimestamp": name}, "status": status}


def observed(j: dict[str, Any] | None = None, *pods: dict[str, Any], **kw: Any) -> Observed:
    base: dict[str, Any] = {
        "launched_hash": "h" if j is not None else None,
        "current_hash": "h",
        "job": j,
        "pods": tuple(pods),
        "backoff_limit": 1,
        "memory": "4Gi",
    }
    base.update(kw)
    return Observed(**base)


def cond(plan_status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = find_condition(plan_status["conditions"], type_)
    assert found is not None, type_
    return found


def test_new_resource_launches_a_job() -> None:
    plan = compute_status(ftj(), observed(None), NOW)
    assert plan.create_job and not plan.delete_job
    assert cond(plan.status, "Validated")["status"] == "True"
    assert plan.status["phase"] == "Pending"
    assert plan.status["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in plan.status["conditions"])
    assert {c["type"] for c in plan.status["conditions"]} == {
        "Validated",
        "Running",
        "Succeeded",
        "Failed",
        "Suspended",
    }
    assert [e.reason for e in plan.events] == ["Valid"]


def test_invalid_spec_is_reported_with_the_field_and_nothing_launches() -> None:
    issue = FieldIssue(("spec", "training", "maxSteps"), "expected an integer")
    plan = compute_status(ftj(), observed(None, issues=(issue,), current_hash=None), NOW)
    assert not plan.create_job
    validated = cond(plan.status, "Validated")
    assert validated["status"] == "False" and validated["reason"] == "InvalidSpec"
    assert "spec.training.maxSteps" in validated["message"]
    assert plan.status["phase"] == "Failed"
    assert plan.events[0].type == "Warning"
    # Fixing the spec launches: InvalidSpec is not terminal.
    fixed = compute_status(ftj(plan.status), observed(None), NOW)
    assert fixed.create_job and fixed.status["phase"] == "Pending"
    assert cond(fixed.status, "Failed")["status"] == "False"


def test_running_pod_sets_running_and_start_time() -> None:
    plan = compute_status(ftj(), observed(job(), pod("p1", "Running")), NOW)
    assert cond(plan.status, "Running")["status"] == "True"
    assert plan.status["phase"] == "Running"
    assert plan.status["startTime"] == "2026-01-01T11:00:00Z"
    assert plan.status["attempts"] == 1 and plan.status["jobName"] == "a-train"
    assert not plan.create_job and not plan.delete_job


def test_job_complete_is_success_and_sticky() -> None:
    done = job("Complete", completionTime="2026-01-01T11:30:00Z")
    plan = compute_status(ftj(), observed(done, pod("p1", "Succeeded")), NOW)
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["completionTime"] == "2026-01-01T11:30:00Z"
    later = compute_status(ftj(plan.status), observed(None), NOW)
    assert later.status["phase"] == "Succeeded" and not later.create_job


def test_oom_kill_retries_then_fails_with_advice() -> None:
    oom = {"exitCode": 137, "reason": "OOMKilled"}
    first = compute_status(ftj(), observed(job(), pod("p1", "Failed", terminated=oom)), NOW)
    running = cond(first.status, "Running")
    assert running["reason"] == "Restarting" and "OOM" not in running["reason"]
    assert "gradientCheckpointing" in running["message"]
    assert first.status["phase"] == "Pending" and not first.delete_job
    second = compute_status(
        ftj(first.status),
        observed(job(), pod("p1", "Failed", terminated=oom), pod("p2", "Failed", terminated=oom)),
        NOW,
    )
    failed = cond(second.status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "OOMKilled"
    assert "perDeviceTrainBatchSize" in failed["message"] and "qlora" in failed["message"]
    assert "4Gi" in failed["message"]
    assert second.delete_job and second.status["phase"] == "Failed"
    assert second.status["attempts"] == 2


def test_exit_code_2_fails_at_once_with_termination_message() -> None:
    bad = {"exitCode": 2, "reason": "Error", "message": "dataset field 'tone' missing\n"}
    plan = compute_status(ftj(), observed(job(), pod("p1", "Failed", terminated=bad)), NOW)
    failed = cond(plan.status, "Failed")
    assert failed["reason"] == "InvalidInput"
    assert "dataset field 'tone' missing" in failed["message"]
    assert plan.delete_job
    # After the Job is gone, the outcome stays.
    after = compute_status(ftj(plan.status), observed(None), NOW)
    assert after.status["phase"] == "Failed" and not after.create_job


def test_untrusted_storage_fails_at_once_with_its_own_reason() -> None:
    message = "checkpoint-40/state.pt: sha256 differs from the manifest's"
    bad = {"exitCode": 3, "reason": "Error", "message": message}
    plan = compute_status(ftj(), observed(job(), pod("p1", "Failed", terminated=bad)), NOW)
    failed = cond(plan.status, "Failed")
    assert failed["reason"] == "IntegrityCheckFailed"
    assert message in failed["message"] and "nothing from it was loaded" in failed["message"]
    assert plan.delete_job and plan.status["phase"] == "Failed"
    # a plain crash (exit 1) is retried instead
    crash = {"exitCode": 1, "reason": "Error", "message": "boom"}
    retried = compute_status(ftj(), observed(job(), pod("p1", "Failed", terminated=crash)), NOW)
    assert cond(retried.status, "Running")["reason"] == "Restarting"


def test_eviction_does_not_count_toward_backoff_limit() -> None:
    evicted = pod("p1", "Failed", reason="Evicted", message="The node was low on memory.")
    evicted2 = pod("p2", "Failed", reason="Evicted", message="again")
    plan = compute_status(ftj(), observed(job(), evicted, evicted2, pod("p3", "Pending")), NOW)
    assert cond(plan.status, "Failed")["status"] == "False"
    assert not plan.delete_job
    was_running = compute_status(ftj(), observed(job(), pod("p1", "Running")), NOW).status
    plan = compute_status(ftj(was_running), observed(job(), evicted, evicted2), NOW)
    running = cond(plan.status, "Running")
    assert running["reason"] == "Restarting" and "does not count" in running["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Restarting")]
    assert classify_pod(evicted).kind == "disrupted"
    deleted = pod("p4", "Running")
    deleted["metadata"]["deletionTimestamp"] = "x"
    assert classify_pod(deleted).kind == "disrupted"


def test_generic_failures_exhaust_backoff_limit() -> None:
    err = {"exitCode": 1, "reason": "Error", "message": "CUDA error"}
    plan = compute_status(
        ftj(),
        observed(job(), pod("p1", "Failed", terminated=err), pod("p2", "Failed", terminated=err)),
        NOW,
    )
    failed = cond(plan.status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "CUDA error" in failed["message"]


def test_deadline_exceeded_from_the_job() -> None:
    plan = compute_status(ftj(), observed(job("Failed:DeadlineExceeded")), NOW)
    failed = cond(plan.status, "Failed")
    assert failed["reason"] == "DeadlineExceeded" and not plan.delete_job


def test_suspend_deletes_the_job_and_resume_recreates_it() -> None:
    plan = compute_status(ftj(suspend=True), observed(job(), pod("p1", "Running")), NOW)
    assert plan.delete_job and plan.status["phase"] == "Suspended"
    assert cond(plan.status, "Suspended")["status"] == "True"
    gone = compute_status(ftj(plan.status, suspend=True), observed(None, launched_hash="h"), NOW)
    assert not gone.create_job and gone.status["phase"] == "Suspended"
    resumed = compute_status(ftj(gone.status), observed(None, launched_hash="h"), NOW)
    assert resumed.create_job
    assert cond(resumed.status, "Suspended")["reason"] == "Resumed"


def test_spec_change_after_launch_is_refused_with_the_fields() -> None:
    plan = compute_status(
        ftj(),
        observed(
            job(), pod("p1", "Running"), current_hash="other", changed=("spec.training.maxSteps",)
        ),
        NOW,
    )
    validated = cond(plan.status, "Validated")
    assert validated["status"] == "False" and validated["reason"] == "SpecChangeRefused"
    assert "spec.training.maxSteps" in validated["message"]
    assert plan.status["phase"] == "Running" and not plan.delete_job and not plan.create_job


def test_ttl_deletes_the_resource_after_it_ended() -> None:
    done = compute_status(
        ftj(), observed(job("Complete", completionTime="2026-01-01T11:59:50Z")), NOW
    )
    wait = compute_status(
        ftj(done.status, ttlSecondsAfterFinished=60), observed(job("Complete")), NOW
    )
    assert not wait.delete_resource and wait.requeue_after == 50
    due = compute_status(
        ftj(done.status, ttlSecondsAfterFinished=60),
        observed(job("Complete")),
        NOW + timedelta(seconds=50),
    )
    assert due.delete_resource


def test_transition_time_moves_only_on_status_change_and_patch_is_minimal() -> None:
    conds = set_condition([], "Running", "True", "A", "m", generation=1, now=NOW)
    same = set_condition(
        conds, "Running", "True", "B", "m2", generation=2, now=NOW + timedelta(hours=1)
    )
    assert same[0]["lastTransitionTime"] == conds[0]["lastTransitionTime"]
    flipped = set_condition(
        same, "Running", "False", "C", "m", generation=2, now=NOW + timedelta(hours=1)
    )
    assert flipped[0]["lastTransitionTime"] != conds[0]["lastTransitionTime"]
    plan = compute_status(ftj(), observed(job(), pod("p1", "Running")), NOW)
    again = compute_status(ftj(plan.status), observed(job(), pod("p1", "Running")), NOW)
    assert status_patch(plan.status, again.status) == {} and again.events == []
    assert derive_phase([]) == "Pending"
    # Every field is the operator's: a progress change is sent, and only it.
    moved = {**again.status, "progress": {"step": 1}}
    assert status_patch(again.status, moved) == {"progress": {"step": 1}}


def test_unschedulable_pod_says_why_in_running_condition() -> None:
    scheduled = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient cpu.",
    }
    stuck = pod("p1", "Pending", conditions=[scheduled])
    assert classify_pod(stuck).reason == "Unschedulable"
    plan = compute_status(ftj(), observed(job(), stuck), NOW)
    running = find_condition(plan.status["conditions"], "Running")
    assert running is not None and running["reason"] == "PodPending"
    assert running["message"] == "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu."
    # A pod that is scheduled and pulling its image says that instead.
    pulling = pod("p2", "Pending")
    pulling["status"]["containerStatuses"] = [
        {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}
    ]
    assert classify_pod(pulling).reason == "ContainerCreating"


def outcome_message(**fields: Any) -> str:
    import json

    return json.dumps({"kind": "FineTuneJob", "state": "Succeeded", **fields})


def test_the_succeeded_pods_outcome_fills_artifacts_and_metrics_over_what_status_held() -> None:
    done = job("Complete", completionTime="2026-01-01T11:30:00Z")
    said = outcome_message(
        artifacts={"adapter": "s3://b/n/finetunejobs/a-u1/adapter/"},
        metrics={"evalLoss": 1.25},
        progress={"step": 10, "totalSteps": 10, "percent": 100},
    )
    finished = pod("p1", "Succeeded", terminated={"exitCode": 0, "message": said})
    forged = {"artifacts": {"adapter": "s3://elsewhere/adapter/"}, "metrics": {"evalLoss": 0.01}}
    plan = compute_status(ftj(forged), observed(done, finished), NOW)
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["artifacts"] == {"adapter": "s3://b/n/finetunejobs/a-u1/adapter/"}
    assert plan.status["metrics"] == {"evalLoss": 1.25}
    assert plan.status["progress"]["percent"] == 100
    # the same pass again, the pods gone (the Job deleted): the fields stay as they were
    gone = compute_status(ftj(plan.status), observed(None, launched_hash="h"), NOW)
    assert gone.status["phase"] == "Succeeded"
    assert gone.status["artifacts"] == plan.status["artifacts"]
    assert gone.status["metrics"] == plan.status["metrics"]


def test_an_outcome_of_another_kind_or_a_malformed_one_fills_nothing() -> None:
    done = job("Complete", completionTime="2026-01-01T11:30:00Z")
    for message in (
        outcome_message(kind="OptimizeJob", artifacts={"model": "s3://x/"}),
        '{"kind": "FineTuneJob", "state": "Succeeded", "artifacts": {"bogus": 1}}',
        "finished at step 10",
    ):
        finished = pod("p1", "Succeeded", terminated={"exitCode": 0, "message": message})
        plan = compute_status(ftj(), observed(done, finished), NOW)
        assert plan.status["phase"] == "Succeeded" and "artifacts" not in plan.status


def test_progress_read_from_the_running_pod_is_shown_and_warnings_degrade() -> None:
    live = {
        "progress": {"step": 4, "totalSteps": 10},
        "metrics": {"trainLoss": 2.0},
        "warnings": [{"type": "Overfitting", "sinceStep": 3, "message": "eval loss rose"}],
    }
    plan = compute_status(ftj(), observed(job(), pod("p1", "Running"), progress=live), NOW)
    assert plan.status["progress"] == {"step": 4, "totalSteps": 10}
    degraded = cond(plan.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Overfitting")
    assert ("Warning", "Overfitting") in [(e.type, e.reason) for e in plan.events]
    # the warning gone from the next record: Degraded turns False
    calm = {**live, "warnings": []}
    again = compute_status(
        ftj(plan.status), observed(job(), pod("p1", "Running"), progress=calm), NOW
    )
    assert cond(again.status, "Degraded")["status"] == "False"
    assert cond(again.status, "Running")["status"] == "True"


def test_a_terminal_status_written_over_a_running_job_is_computed_again() -> None:
    running = observed(job(), pod("p1", "Running"))
    honest = compute_status(ftj(), running, NOW).status
    for type_, reason in (("Succeeded", "Completed"), ("Failed", "TrainerFailed")):
        forged = json.loads(json.dumps(honest))
        forged["conditions"] = set_condition(
            forged["conditions"], type_, "True", reason, "forged", generation=3, now=NOW
        )
        forged["artifacts"] = {"adapter": "s3://elsewhere/"}
        plan = compute_status(ftj(forged), running, NOW)
        assert plan.status["phase"] == "Running", type_
        assert plan.status["artifacts"] is None  # gone in the same pass
        assert cond(plan.status, type_)["status"] == "False"
        assert not plan.delete_job  # the run goes on
    # the same conditions with the Job finished as they say: they stay
    done = job("Complete", completionTime="2026-01-01T11:30:00Z")
    finished = pod("p1", "Succeeded", terminated={"exitCode": 0})
    ended = compute_status(ftj(), observed(done, finished), NOW).status
    again = compute_status(ftj(ended), observed(done, finished), NOW)
    assert again.status["phase"] == "Succeeded" and again.events == []


def test_a_running_job_shows_what_its_log_says_not_what_status_held() -> None:
    forged = {"artifacts": {"adapter": "s3://elsewhere/"}, "metrics": {"evalLoss": 0.01}}
    running = observed(job(), pod("p1", "Running"))
    plan = compute_status(ftj(forged), running, NOW)
    assert plan.status["artifacts"] is None and plan.status["metrics"] is None  # deleted
    assert status_patch(forged, plan.status) == {"artifacts": None, "metrics": None} | {
        k: v for k, v in plan.status.items() if k not in ("artifacts", "metrics")
    }
    live = {"progress": {"step": 2}, "metrics": {"trainLoss": 3.0}, "warnings": []}
    plan = compute_status(ftj(forged), observed(job(), pod("p1", "Running"), progress=live), NOW)
    assert plan.status["metrics"] == {"trainLoss": 3.0} and plan.status["artifacts"] is None


def test_a_key_written_into_a_field_by_someone_else_is_deleted_by_the_patch() -> None:
    # A merge patch keeps what it does not name: a forged key inside an object the operator
    # writes (a metric, search.best) is deleted with null, not left beside the computed ones.
    forged = {"metrics": {"evalLoss": 0.01}, "search": {"completed": 0, "best": {"trial": 1}}}
    desired = {"metrics": {"trainLoss": 3.0}, "search": {"completed": 0}}
    assert status_patch(forged, desired) == {
        "metrics": {"evalLoss": None, "trainLoss": 3.0},
        "search": {"best": None},
    }
    assert status_patch(desired, desired) == {}


SEARCH_PREFIX = "s3://b/n/finetunejobs/a-u1/"
SEARCH_SPEC: dict[str, Any] = {
    "output": {"uri": "s3://b/"},
    "search": {
        "strategy": "grid",
        "trials": 2,
        "parallelism": 2,
        "space": {"training.learningRate": {"type": "choice", "values": [0.01, 0.02]}},
    },
}


def finished_trial(number: int, value: float | None) -> TrialObserved:
    """Trial `number`'s Job, complete, with its pod's report (Failed without a value)."""
    record: dict[str, Any] = {"trial": number, "state": "Failed", "message": "diverged"}
    if value is not None:
        record = {
            "trial": number,
            "state": "Complete",
            "value": value,
            "step": 4,
            "params": {"training.learningRate": 0.01 * (number + 1)},
            "adapter": f"{SEARCH_PREFIX}trials/{number}/adapter/",
        }
    message = json.dumps({"kind": "FineTuneJob", "state": "Succeeded", "trial": record})
    trial_pod = pod(
        f"a-trial-{number}-x", "Succeeded", terminated={"exitCode": 0, "message": message}
    )
    trial_job = job("Complete")
    trial_job["metadata"] = {"name": f"a-trial-{number}", "uid": f"t{number}"}
    return TrialObserved(number, trial_job, (trial_pod,))


def test_a_forged_best_over_a_finished_search_is_computed_again_from_its_trials() -> None:
    trials = (finished_trial(0, 0.5), finished_trial(1, 0.3))
    seen = Observed(
        launched_hash="h", current_hash="h", study=StudyObserved(SEARCH_SPEC, SEARCH_PREFIX, trials)
    )
    honest = compute_status(ftj(None, **SEARCH_SPEC), seen, NOW).status
    assert honest["phase"] == "Succeeded" and honest["search"]["best"]["trial"] == 1
    forged = json.loads(json.dumps(honest))
    forged["search"]["best"] = {"trial": 0, "params": {"training.learningRate": 0.01}, "value": 0}
    forged["artifacts"]["adapter"] = f"{SEARCH_PREFIX}trials/0/adapter/"
    plan = compute_status(ftj(forged, **SEARCH_SPEC), seen, NOW)
    assert plan.status["phase"] == "Succeeded" and plan.events == []
    assert plan.status["search"] == honest["search"]
    assert plan.status["artifacts"] == honest["artifacts"]
    patch = status_patch(forged, plan.status)
    assert patch["search"] == {
        "best": {"trial": 1, "params": {"training.learningRate": 0.02}, "value": 0.3}
    }
    assert patch["artifacts"] == {"adapter": f"{SEARCH_PREFIX}trials/1/adapter/"}


def test_a_forged_success_over_a_search_whose_trials_all_failed_is_not_kept() -> None:
    trials = (finished_trial(0, None), finished_trial(1, None))
    seen = Observed(
        launched_hash="h", current_hash="h", study=StudyObserved(SEARCH_SPEC, SEARCH_PREFIX, trials)
    )
    honest = compute_status(ftj(None, **SEARCH_SPEC), seen, NOW).status
    assert honest["phase"] == "Failed" and "best" not in honest["search"]
    forged = json.loads(json.dumps(honest))
    forged["conditions"] = set_condition(
        forged["conditions"], "Succeeded", "True", "Completed", "forged", generation=3, now=NOW
    )
    forged["conditions"] = set_condition(
        forged["conditions"], "Failed", "False", "NotFailed", "forged", generation=3, now=NOW
    )
    forged["search"]["best"] = {"trial": 0, "params": {}, "value": 0}
    forged["artifacts"] = {"adapter": f"{SEARCH_PREFIX}trials/0/adapter/"}
    plan = compute_status(ftj(forged, **SEARCH_SPEC), seen, NOW)
    assert plan.status["phase"] == "Failed", plan.status["conditions"]
    assert plan.status["artifacts"] is None and "best" not in plan.status["search"]
