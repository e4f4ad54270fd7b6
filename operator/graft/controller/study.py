"""Pure: a FineTuneJob with `spec.search` on a cluster is a study of trial Jobs.

Trials are numbered 0..N-1 and each runs as its own Job (`<name>-trial-<n>`, the usual trainer
Job with `GRAFT_TRIAL=<n>`), at most `parallelism` at once, lowest numbers first. The trial pod
asks optuna for its parameters, prunes itself and reports its outcome (state, objective,
parameters, adapter) as its termination message (graft_trainer.search_trial); the operator
needs neither optuna nor the store.

The study state is `status.search`: a finished trial's record is kept there for good, so it
outlives its Job and pods; a trial whose Job exists is not launched again. After an operator
restart the same records and the same Jobs give the same answer: no finished trial is rerun,
no trial number is launched twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from graft import search_plan
from graft.api.search import SearchSpec
from graft.contract import TrainerOutcome
from graft.controller.conditions import true_condition
from graft.controller.pods import classify_pod, failure_summary
from graft.exit_codes import NOT_RETRIED

FINISHED = ("Complete", "Pruned", "Failed")


@dataclasses.dataclass(frozen=True)
class TrialObserved:
    """A trial Job and its pods as the reconciler saw them."""

    number: int
    job: dict[str, Any]
    pods: tuple[dict[str, Any], ...] = ()


@dataclasses.dataclass
class StudyPlan:
    search: dict[str, Any]  # status.search
    progress: dict[str, Any]  # status.progress: trials finished of the target
    artifacts: dict[str, Any] | None  # the best trial's, once the study is done
    launch: list[int]  # trial numbers to create Jobs for now
    outcome: Literal["running", "succeeded", "failed"]
    message: str
    pods: int  # trial pods seen, for status.attempts
    active: int = 0  # trials with a Job that has not finished


def reported_record(number: int, outcome: TrainerOutcome | None) -> dict[str, Any]:
    """The record a succeeded trial pod reported in its outcome (Failed when it reported
    nothing usable, or another trial's)."""
    trial = outcome.trial if outcome is not None else None
    if trial is None or trial.trial != number:
        return {"number": number, "state": "Failed", "message": "the trial reported no result"}
    return {
        "number": number,
        "state": trial.state,
        "params": dict(trial.params),
        "value": trial.value,
        "step": trial.step,
        "adapter": trial.adapter,
        "message": trial.message,
    }


def observe_trial(trial: TrialObserved, backoff_limit: int) -> dict[str, Any]:
    """One trial's record from its Job and pods: finished (from the pod's report or its
    failures), or Running/Pending."""
    outcomes = [classify_pod(p) for p in trial.pods]
    succeeded = next((o for o in outcomes if o.kind == "succeeded"), None)
    if succeeded is not None:
        return reported_record(trial.number, succeeded.outcome)
    failures = sorted((o for o in outcomes if o.kind == "failed"), key=lambda o: o.name)
    invalid = [o for o in failures if o.exit_code in NOT_RETRIED]
    if invalid or len(failures) > backoff_limit:
        _, message = failure_summary((invalid or failures)[-1])
        return {"number": trial.number, "state": "Failed", "message": message}
    job_failed = true_condition(trial.job, "Failed")
    if job_failed is not None:
        reason = str(job_failed.get("reason") or "JobFailed")
        return {
            "number": trial.number,
            "state": "Failed",
            "message": f"the trial Job failed: {reason}",
        }
    running = any(o.kind == "running" for o in outcomes)
    return {"number": trial.number, "state": "Running" if running else "Pending"}


def plan_study(
    spec: dict[str, Any],
    prefix: str,
    previous: dict[str, Any] | None,
    trials: list[TrialObserved],
    backoff_limit: int,
    job_name: str,
) -> StudyPlan:
    """The study's status and the trials to launch, from the last status and what runs."""
    # A finished trial's record outlives its Job and pods in status; what a trial's pods show
    # wins over it, so a record written into status by anyone else counts only for a trial
    # whose pods are gone (a running trial stays running whatever status says).
    records: dict[int, dict[str, Any]] = {}
    for record in (previous or {}).get("trials") or []:
        if record.get("state") in FINISHED:
            records[int(record["number"])] = dict(record)
    for trial in trials:
        record = observe_trial(trial, backoff_limit)
        if record["state"] in (*FINISHED, "Running") or trial.number not in records:
            records[trial.number] = record
    return plan_records(spec, prefix, records, job_name, pods=sum(len(t.pods) for t in trials))


def plan_records(
    spec: dict[str, Any],
    prefix: str,
    records: dict[int, dict[str, Any]],
    job_name: str,
    *,
    pods: int = 0,
) -> StudyPlan:
    """The study's status and the trials to launch, from one record per started trial
    (finished, or Pending/Running). Both executors plan with it: the operator, whose records
    come from trial Jobs and pods (`pods` of them seen, for status.attempts), and `graft run`,
    whose come from its worker processes (no pods)."""
    search = SearchSpec.model_validate(spec["search"])
    target = search_plan.target_trials(search)
    # only the study's own numbers: a record numbered outside 0..target-1 is no trial of it
    records = {n: dict(record) for n, record in records.items() if 0 <= n < target}
    active = sum(1 for r in records.values() if r["state"] not in FINISHED)
    launch = [n for n in range(target) if n not in records][: max(0, search.parallelism - active)]
    for number in launch:
        records[number] = {"number": number, "state": "Pending"}

    study = search_plan.new_study(spec, search)
    for number in sorted(records):
        r = records[number]
        study.trials.append(
            search_plan.StudyTrial(
                number=number,
                params=dict(r.get("params") or {}),
                state="Running" if r["state"] in ("Pending", "Running") else r["state"],
                value=r.get("value"),
                step=r.get("step"),
                adapter=r.get("adapter"),
                message=r.get("message"),
            )
        )
    summary = search_plan.summary(study, job_name=job_name).to_api()
    for entry in summary["trials"]:  # Pending (no pod yet) is worth telling apart
        if records[entry["number"]]["state"] == "Pending":
            entry["state"] = "Pending"
    finished = sum(1 for r in records.values() if r["state"] in FINISHED)
    progress = {
        "step": finished,
        "totalSteps": target,
        "percent": int(100 * finished / target) if target else 100,
    }
    best = search_plan.best_trial(study)
    counts = (
        f"{summary['completed']} complete, {summary['pruned']} pruned, {summary['failed']} failed"
    )
    if finished < target:
        message = (
            f"{finished} of {target} trials finished ({counts}); {active + len(launch)} running"
        )
        outcome: Literal["running", "succeeded", "failed"] = "running"
        artifacts = None
    elif best is None:
        failed = [r for _, r in sorted(records.items()) if r["state"] == "Failed"]
        cause = next(
            (f"; trial {r['number']}: {r['message']}" for r in failed if r.get("message")), ""
        )
        message = f"no trial completed ({counts}){cause}"
        outcome, artifacts = "failed", None
    else:
        metric = search.objective.metric
        message = f"best trial {best.number}: {metric} {best.value:.4g} ({counts})"
        outcome = "succeeded"
        artifacts = {
            "adapter": best.adapter,
            "report": search_plan.report_uri(prefix),
            "metrics": f"{search_plan.trial_uri(prefix, best.number)}metrics.json",
        }
    return StudyPlan(
        search=summary,
        progress=progress,
        artifacts=artifacts,
        launch=launch,
        outcome=outcome,
        message=message,
        pods=pods,
        active=active,
    )


def best_trial_source(
    status: dict[str, Any], spec: dict[str, Any], prefix: str
) -> tuple[str, dict[str, Any]] | None:
    """Where a finished study's best trial is, and the spec it ran with (what an OptimizeJob or
    AdapterBundle referencing the job uses); None when the job has no search."""
    best = (status.get("search") or {}).get("best")
    if not spec.get("search") or not best:
        return None
    trial = int(best["trial"])
    return (
        search_plan.trial_uri(prefix, trial),
        search_plan.trial_spec(spec, dict(best.get("params") or {})),
    )
