"""Pure status computation: conditions, phase and run bookkeeping from what the cluster shows.

Owns `status.conditions` (Validated, Running, Succeeded, Failed, Suspended), `status.phase`,
`observedGeneration`, `startTime`, `completionTime`, `attempts` and `jobName`. The trainer owns
`progress`, `metrics`, `warnings` and `artifacts` and this module never touches them.

Level-based: the result depends only on the resource (spec and the previous status, for
transition times and the terminal outcome, which outlives the deleted Job), the Job, its pods
and the clock. Calling it twice with the same input gives the same answer.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from graft.api.errors import FieldIssue
from graft.controller.planner import (
    ANNOTATION_SPEC_HASH,
    KUEUE_QUEUE,
    attempts_before,
    kind_of,
)
from graft.controller.pods import (
    DISRUPTION_REASONS,
    OOM_ADVICE,
    PodOutcome,
    classify_pod,
    failure_summary,
)
from graft.controller.sources import GATE_REASONS, SourceGate
from graft.controller.study import TrialObserved, plan_study
from graft.exit_codes import NOT_RETRIED
from graft.policy import GpuBudget, PolicyIssue

CONDITION_TYPES = ("Validated", "Running", "Succeeded", "Failed", "Suspended", "Ready")
__all__ = [
    "DISRUPTION_REASONS",
    "OOM_ADVICE",
    "Event",
    "Observed",
    "Plan",
    "PodOutcome",
    "classify_pod",
    "compute_status",
    "failure_summary",
    "status_patch",
]

OPERATOR_FIELDS = (
    "observedGeneration",
    "conditions",
    "phase",
    "startTime",
    "completionTime",
    "attempts",
    "jobName",
)
# Fields the trainer writes for a single run, the operator for a search (trials cannot share).
STUDY_FIELDS = ("search", "progress", "artifacts")
# Failures that a change elsewhere (the spec, a referenced FineTuneJob) can still undo.
RECOVERABLE_FAILURES = frozenset({"InvalidSpec", "PolicyDenied", *GATE_REASONS.values()})

# A launch over the namespace's GPU budget waits (Pending) and is looked at again this often;
# a finishing Job's own events usually wake it sooner.
GPU_WAIT_REASON = "WaitingForGpuBudget"
GPU_WAIT_REQUEUE = 15.0

# The API server refused to create the Job (quota, an admission webhook, an invalid field): the
# resource says so, and the launch is tried again this often (a quota may free up).
LAUNCH_REFUSED = "LaunchRefused"
LAUNCH_RETRY = 30.0

# A Job without a pod whose controller says why (FailedCreate): looked at again this often, so
# the resource moves on once the quota is raised.
POD_REFUSED = "PodCreateRefused"
POD_REFUSED_RECHECK = 30.0

# A GPU FineTuneJob's CPU pre-flight pod: checking, passed (Validated), failed (Validated False).
PREFLIGHT_CHECKING = "PreflightChecking"
PREFLIGHT_PASSED = "PreflightPassed"
PREFLIGHT_FAILED = "PreflightFailed"
PREFLIGHT_WAIT = (
    "checking the data, model and memory estimate in a CPU pod before the GPU pod is created"
)

DONE_MESSAGES = {
    "FineTuneJob": "training finished",
    "OptimizeJob": "the ONNX model is exported and passed validation",
    "AdapterBundle": "the bundle is exported and every adapter passed the compatibility checks",
}


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclasses.dataclass
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclasses.dataclass
class Plan:
    """What the status should be and what the reconciler should do about the children."""

    status: dict[str, Any]
    create_job: bool = False
    create_preflight: bool = False  # the CPU pod's Job that checks a GPU FineTuneJob first
    delete_preflight: bool = False
    create_trials: list[int] = dataclasses.field(default_factory=list)
    delete_job: bool = False  # for a search: every unfinished trial Job
    delete_resource: bool = False
    requeue_after: float | None = None
    events: list[Event] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class StudyObserved:
    """A searched FineTuneJob's trial Jobs, and what the study needs to know."""

    spec: dict[str, Any]  # the launched spec (with search)
    prefix: str  # the job's artifact prefix
    trials: tuple[TrialObserved, ...] = ()


@dataclasses.dataclass(frozen=True)
class PreflightObserved:
    """The pre-flight Job of a GPU FineTuneJob whose GPU pod is not created yet (None: not
    created either), and its pods."""

    job: dict[str, Any] | None = None
    pods: tuple[dict[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Observed:
    """The world as the reconciler saw it for one resource."""

    issues: tuple[FieldIssue, ...] = ()  # of the current spec; empty when valid
    launched_hash: str | None = None  # spec hash of the Job or spec ConfigMap, if launched
    current_hash: str | None = None  # spec hash of the current spec, if valid
    changed: tuple[str, ...] = ()  # fields changed since launch
    job: dict[str, Any] | None = None
    pods: tuple[dict[str, Any], ...] = ()
    backoff_limit: int = 2  # of the launched spec
    memory: str | None = None  # memory limit of the launched spec, for OOM messages
    # Distinct pods of the Job seen so far, deleted ones included (the reconciler remembers
    # them); None: only the pods in `pods`.
    pods_seen: int | None = None
    source: SourceGate | None = None  # referenced FineTuneJobs, before launch; None: none
    study: StudyObserved | None = None  # a FineTuneJob with spec.search
    # The namespace's GPU cap and what its unfinished Jobs (this resource's trials too) hold;
    # None: no cap.
    gpu_budget: GpuBudget | None = None
    gpus: int = 0  # GPUs one Job of the launched (or to be launched) spec holds
    # Why the Job controller could not create the Job's pod (its newest FailedCreate Event: a
    # pod quota, a missing PriorityClass, an admission webhook); None: no such Event.
    pod_refused: str | None = None
    # A GPU FineTuneJob not launched yet, checked in a CPU pod first; None: no such check.
    preflight: PreflightObserved | None = None


def find_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    for cond in conditions:
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    cond = find_condition(conditions, type_)
    return cond is not None and cond.get("status") == "True"


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    *,
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new list with the condition set; lastTransitionTime moves only when status changes."""
    old = find_condition(conditions, type_)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        # Never empty: the v1.20 apiserver turns "" into null in a merge patch and rejects it.
        "message": message or reason,
        "lastTransitionTime": since or rfc3339(now),
        "observedGeneration": generation,
    }
    rest = [c for c in conditions if c.get("type") != type_]
    ordered = sorted([*rest, new], key=lambda c: _order(str(c.get("type"))))
    return ordered


def _order(type_: str) -> int:
    return CONDITION_TYPES.index(type_) if type_ in CONDITION_TYPES else len(CONDITION_TYPES)


def derive_phase(conditions: list[dict[str, Any]]) -> str:
    for type_, phase in (
        ("Succeeded", "Succeeded"),
        ("Failed", "Failed"),
        ("Suspended", "Suspended"),
        ("Running", "Running"),
    ):
        if is_true(conditions, type_):
            return phase
    return "Pending"


def is_terminal(status: dict[str, Any]) -> bool:
    """Succeeded, or Failed for a reason other than an (editable) invalid spec."""
    conditions = status.get("conditions") or []
    failed = find_condition(conditions, "Failed")
    return is_true(conditions, "Succeeded") or (
        failed is not None
        and failed.get("status") == "True"
        and failed.get("reason") not in RECOVERABLE_FAILURES
    )


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _events(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[Event]:
    events: list[Event] = []
    for cond in after:
        type_ = str(cond["type"])
        old = find_condition(before, type_)
        if old and (old.get("status"), old.get("reason")) == (cond["status"], cond["reason"]):
            continue
        if old is None and cond["status"] != "True" and type_ != "Validated":
            continue
        warning = (
            (type_ == "Failed" and cond["status"] == "True")
            or (type_ == "Validated" and cond["status"] == "False")
            or cond["reason"] in ("Restarting", "Retrying")
        )
        events.append(
            Event("Warning" if warning else "Normal", str(cond["reason"]), str(cond["message"]))
        )
    return events


def compute_status(obj: dict[str, Any], observed: Observed, now: datetime) -> Plan:
    """The operator-owned status of `obj` and the actions that make the cluster match it."""
    prev: dict[str, Any] = dict(obj.get("status") or {})
    before: list[dict[str, Any]] = list(prev.get("conditions") or [])
    generation = int(obj["metadata"].get("generation") or 1)
    spec = obj.get("spec") or {}
    kind = kind_of(obj)
    suspend = bool(spec.get("suspend"))
    ttl = spec.get("ttlSecondsAfterFinished")
    launched = observed.launched_hash is not None or observed.job is not None
    if observed.study is not None:
        launched = launched or bool(observed.study.trials)
    status: dict[str, Any] = {k: prev[k] for k in OPERATOR_FIELDS if k in prev}
    status["observedGeneration"] = generation
    conds = before
    plan = Plan(status=status)

    def cond(type_: str, value: Literal["True", "False"], reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, type_, value, reason, message, generation=generation, now=now)

    def finish() -> Plan:
        if kind == "AdapterBundle":
            _set_ready(cond, conds)
        status["conditions"] = conds
        status["phase"] = derive_phase(conds)
        plan.events = _events(before, conds) + plan.events
        return plan

    # Validated: the current spec, and whether it still matches what was launched.
    issues_text = "; ".join(str(i) for i in observed.issues)
    # The platform's rules refused it (a spec edit can still fix it), or the API's did.
    refusal = (
        "PolicyDenied"
        if any(isinstance(i, PolicyIssue) for i in observed.issues)
        else "InvalidSpec"
    )
    if observed.issues:
        suffix = " (the launched spec keeps running)" if launched else ""
        cond("Validated", "False", refusal, issues_text + suffix)
    elif launched and observed.launched_hash not in (None, observed.current_hash):
        fields = ", ".join(observed.changed) or "the spec"
        cond(
            "Validated",
            "False",
            "SpecChangeRefused",
            f"{fields} changed after the Job was created and is ignored: only spec.suspend and "
            "spec.ttlSecondsAfterFinished take effect once a run started. Revert the change, "
            "or create a new resource.",
        )
    else:
        checked = find_condition(before, "Validated") or {}
        if (checked.get("reason") == PREFLIGHT_PASSED and launched) or (
            checked.get("reason") == PREFLIGHT_FAILED and is_terminal(prev)
        ):
            # What the pre-flight pod found stays the word on the spec it checked.
            cond(
                "Validated",
                checked["status"],
                checked["reason"],
                str(checked.get("message") or ""),
            )
        else:
            cond("Validated", "True", "Valid", "the spec is valid")

    if not launched and observed.issues:
        not_launched = "nothing is launched until the spec is valid"
        if refusal == "PolicyDenied":
            not_launched = "nothing is launched until the spec meets the platform's policy"
        cond("Failed", "True", refusal, issues_text)
        cond("Running", "False", refusal, not_launched)
        cond("Succeeded", "False", refusal, not_launched)
        cond("Suspended", "False", "NotSuspended", "not suspended")
        return finish()

    job = observed.job
    if is_terminal(prev):
        succeeded = is_true(before, "Succeeded")
        cond("Running", "False", "Completed" if succeeded else "Failed", "the run has ended")
        if not succeeded and job is not None and not job_finished(job):
            plan.delete_job = True
        if ttl is not None:
            done = parse_time(status.get("completionTime")) or now
            due = done + timedelta(seconds=int(ttl))
            if now >= due:
                plan.delete_resource = True
                plan.events.append(
                    Event("Normal", "TTLExpired", f"deleting the resource {ttl}s after it ended")
                )
            else:
                plan.requeue_after = (due - now).total_seconds()
        return finish()

    if find_condition(conds, "Failed") is None or is_true(conds, "Failed"):
        cond("Failed", "False", "NotFailed", "no failure")
    if find_condition(conds, "Succeeded") is None or is_true(conds, "Succeeded"):
        cond("Succeeded", "False", "NotFinished", "not finished")

    if suspend:
        if job is not None or (observed.study is not None and observed.study.trials):
            plan.delete_job = True
        cond(
            "Suspended",
            "True",
            "Suspended",
            "spec.suspend is true: the trainer pod is stopped and checkpoints are kept; "
            "setting it to false resumes from the last checkpoint",
        )
        cond("Running", "False", "Suspended", "suspended")
        return finish()
    if is_true(before, "Suspended"):
        cond(
            "Suspended",
            "False",
            "Resumed",
            "resumed: the new pod continues from the last checkpoint",
        )
    elif find_condition(conds, "Suspended") is None:
        cond("Suspended", "False", "NotSuspended", "not suspended")

    gate = observed.source
    if job is None and not launched and gate is not None and gate.state != "ready":
        if gate.state == "waiting":
            cond("Running", "False", gate.reason, gate.message)
            plan.requeue_after = 30.0  # the FineTuneJob's own events usually come first
        else:
            cond("Failed", "True", gate.reason, gate.message)
            cond(
                "Running", "False", gate.reason, "nothing is launched until the sources are usable"
            )
        return finish()

    pre = observed.preflight
    if (
        pre is not None
        and job is None
        and not launched
        and _preflight(pre, observed.current_hash, cond, status, plan, now)
    ):
        return finish()

    if observed.study is not None:
        _study(observed, obj, status, plan, cond, now)
        return finish()

    if job is None:
        budget = observed.gpu_budget
        if budget is not None and observed.gpus > budget.free:
            cond("Running", "False", GPU_WAIT_REASON, budget.wait_message(observed.gpus))
            plan.requeue_after = GPU_WAIT_REQUEUE
            return finish()
        plan.create_job = True
        cond("Running", "False", "Launching", "creating the trainer Job")
        return finish()

    status["jobName"] = job["metadata"]["name"]
    job_status = job.get("status") or {}
    outcomes = [classify_pod(p) for p in observed.pods]
    seen = max(len(outcomes), observed.pods_seen or 0)
    status["attempts"] = max(int(prev.get("attempts") or 0), attempts_before(job) + seen)
    if not status.get("startTime"):
        started = job_status.get("startTime")
        if started or outcomes:
            status["startTime"] = started or rfc3339(now)

    failures = sorted((o for o in outcomes if o.kind == "failed"), key=lambda o: o.name)
    invalid = [o for o in failures if o.exit_code in NOT_RETRIED]
    complete = job_condition(job, "Complete")
    job_failed = job_condition(job, "Failed")
    if invalid:
        reason, message = failure_summary(invalid[0], observed.memory)
        _fail(cond, status, plan, reason, message, now, job)
        return finish()
    if complete is not None:
        cond("Succeeded", "True", "Completed", DONE_MESSAGES.get(kind, "finished"))
        cond("Running", "False", "Completed", DONE_MESSAGES.get(kind, "finished"))
        status["completionTime"] = job_status.get("completionTime") or rfc3339(now)
        return finish()
    if len(failures) > observed.backoff_limit:
        reason, message = failure_summary(failures[-1], observed.memory)
        if reason == "TrainerFailed":
            reason = "BackoffLimitExceeded"
        message = f"{len(failures)} failed attempts (backoffLimit {observed.backoff_limit}); last: {message}"
        _fail(cond, status, plan, reason, message, now, job)
        return finish()
    if job_failed is not None:
        job_reason = str(job_failed.get("reason") or "JobFailed")
        if job_reason == "DeadlineExceeded":
            deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
            message = (
                f"the attempt ran longer than its deadline ({deadline} s: "
                "spec.activeDeadlineSeconds, or the platform's default)"
            )
        elif job_reason == "BackoffLimitExceeded":
            job_reason = "TooManyDisruptions"
            message = "the pod was lost too often (evictions or node failures)"
        else:
            message = str(job_failed.get("message") or "the Job failed")
        _fail(cond, status, plan, job_reason, message, now, job)
        return finish()

    held = job_condition(job, "Suspended")
    if held is not None and not any(o.kind in ("running", "pending") for o in outcomes):
        # Graft deletes its Jobs to suspend them: a suspended Job is a queue's (Kueue) hold.
        queue = (job["metadata"].get("labels") or {}).get(KUEUE_QUEUE)
        where = f"queue {queue}" if queue else "its queue"
        cond(
            "Running",
            "False",
            "Queued",
            f"the Job waits for {where} to admit it (the Job is suspended until then)",
        )
        return finish()
    running = [o for o in outcomes if o.kind == "running"]
    if running:
        cond("Running", "True", "TrainerRunning", f"pod {running[0].name} is training")
        return finish()
    if any(o.kind == "succeeded" for o in outcomes):
        cond("Running", "False", "Finishing", "the trainer pod succeeded; the Job is finishing")
        return finish()
    lost = [o for o in outcomes if o.kind in ("disrupted", "failed")]
    if lost:
        last = lost[-1]
        if last.kind == "disrupted":
            detail = (
                f"pod {last.name} was lost ({last.reason}: {last.message}); it does not count "
                "toward backoffLimit"
            )
        else:
            detail = failure_summary(last, observed.memory)[1]
            detail += f" (attempt {len(failures)} of {observed.backoff_limit + 1})"
        cond(
            "Running",
            "False",
            "Restarting",
            f"{detail}; a new pod resumes from the last checkpoint",
        )
        return finish()
    pending = [o for o in outcomes if o.kind == "pending"]
    waiting = next((o for o in pending if o.reason), None)
    if not outcomes and observed.pod_refused:
        cond(
            "Running",
            "False",
            POD_REFUSED,
            f"the Job controller cannot create the trainer pod: {observed.pod_refused}",
        )
        plan.requeue_after = POD_REFUSED_RECHECK
    elif waiting is not None:
        cond("Running", "False", "PodPending", f"{waiting.reason}: {waiting.message}".rstrip(": "))
    else:
        cond("Running", "False", "PodPending", "waiting for the trainer pod to start")
    return finish()


def launch_refused(
    obj: dict[str, Any], status: dict[str, Any], message: str, now: datetime
) -> Event | None:
    """Record in `status` that the API server refused the launch; the Warning Event to post,
    unless the resource already said exactly this."""
    before = find_condition((obj.get("status") or {}).get("conditions") or [], "Running")
    text = f"the API server refused to create the trainer Job: {message}"
    generation = int(obj["metadata"].get("generation") or 1)
    status["conditions"] = set_condition(
        status.get("conditions") or [],
        "Running",
        "False",
        LAUNCH_REFUSED,
        text,
        generation=generation,
        now=now,
    )
    status["phase"] = derive_phase(status["conditions"])
    if before and before.get("reason") == LAUNCH_REFUSED and before.get("message") == text:
        return None
    return Event("Warning", LAUNCH_REFUSED, text)


def _study(
    observed: Observed,
    obj: dict[str, Any],
    status: dict[str, Any],
    plan: Plan,
    cond: Any,
    now: datetime,
) -> None:
    """The conditions of a searched FineTuneJob from its trials (see `study`)."""
    assert observed.study is not None
    study = plan_study(
        observed.study.spec,
        observed.study.prefix,
        (obj.get("status") or {}).get("search"),
        list(observed.study.trials),
        observed.backoff_limit,
        obj["metadata"]["name"],
    )
    status["search"] = study.search
    status["progress"] = study.progress
    if study.artifacts is not None:
        status["artifacts"] = study.artifacts
    status["attempts"] = max(int(status.get("attempts") or 0), study.pods)
    plan.create_trials = study.launch
    budget = observed.gpu_budget
    held_back = 0
    if budget is not None and observed.gpus and study.launch:
        fits = budget.free // observed.gpus
        held_back = max(0, len(study.launch) - fits)
        plan.create_trials = study.launch[:fits]
        if held_back:
            plan.requeue_after = GPU_WAIT_REQUEUE
    if observed.study.trials and not status.get("startTime"):
        status["startTime"] = rfc3339(now)
    if study.outcome == "succeeded":
        cond("Succeeded", "True", "Completed", f"search finished: {study.message}")
        cond("Running", "False", "Completed", f"search finished: {study.message}")
        status["completionTime"] = rfc3339(now)
    elif study.outcome == "failed":
        cond("Failed", "True", "AllTrialsFailed", f"the search failed: {study.message}")
        cond("Running", "False", "Failed", f"the search failed: {study.message}")
        status["completionTime"] = rfc3339(now)
    elif held_back and not plan.create_trials and not study.active:
        assert budget is not None
        cond("Running", "False", GPU_WAIT_REASON, budget.wait_message(observed.gpus))
    else:
        waiting = f"; {held_back} trials wait for GPUs" if held_back else ""
        cond("Running", "True", "TrialsRunning", study.message + waiting)


def _set_ready(cond: Any, conds: list[dict[str, Any]]) -> None:
    """An AdapterBundle is Ready once it Succeeded: the trainer succeeds only if the contract
    (one base digest, adapter tensors matching the graph, smoke tests) passed."""
    if is_true(conds, "Succeeded"):
        cond("Ready", "True", "BundleReady", "every adapter passed the compatibility checks")
        return
    failed = find_condition(conds, "Failed")
    if failed is not None and failed.get("status") == "True":
        cond("Ready", "False", str(failed["reason"]), str(failed["message"]))
        return
    running = find_condition(conds, "Running") or {}
    cond("Ready", "False", str(running.get("reason") or "NotReady"), "not built yet")


def job_finished(job: dict[str, Any]) -> bool:
    return job_condition(job, "Complete") is not None or job_condition(job, "Failed") is not None


def _preflight(
    pre: PreflightObserved,
    current_hash: str | None,
    cond: Any,
    status: dict[str, Any],
    plan: Plan,
    now: datetime,
) -> bool:
    """The pre-flight step of a GPU FineTuneJob; True while it holds the launch back (checking,
    or failed), False once it passed and the GPU pod may be created."""
    job = pre.job
    if job is None:
        plan.create_preflight = True
        cond("Running", "False", PREFLIGHT_CHECKING, PREFLIGHT_WAIT)
        return True
    if (job["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_HASH) != current_hash:
        # The spec changed before the GPU pod was created: the new one is checked anew.
        plan.delete_preflight, plan.requeue_after = True, 2.0
        cond("Running", "False", PREFLIGHT_CHECKING, "the spec changed; " + PREFLIGHT_WAIT)
        return True
    outcomes = [classify_pod(p) for p in pre.pods]
    passed = next((o for o in outcomes if o.kind == "succeeded"), None)
    if passed is not None or job_condition(job, "Complete") is not None:
        findings = passed.message if passed is not None and passed.message else "passed"
        cond("Validated", "True", PREFLIGHT_PASSED, findings)
        return False
    failures = [o for o in outcomes if o.kind == "failed"]
    refused = next((o for o in failures if o.exit_code in NOT_RETRIED), None)
    gave_up = job_condition(job, "Failed")
    if refused is not None or gave_up is not None:
        last = refused or (failures[-1] if failures else None)
        if last is not None:
            reason, message = failure_summary(last, None)
        else:  # no failed pod to read: the deadline, or pods lost
            reason = str(gave_up.get("reason") if gave_up else "") or "PreflightFailed"
            message = str(gave_up.get("message") if gave_up else "") or "the pre-flight Job failed"
        message = f"pre-flight pod, before any GPU was requested: {message}"
        cond("Validated", "False", PREFLIGHT_FAILED, message)
        _fail(cond, status, plan, reason, message, now, job)
        plan.delete_job = False
        plan.delete_preflight = not job_finished(job)  # no second pod for the same finding
        return True
    pending = next((o for o in outcomes if o.kind == "pending" and o.reason), None)
    if failures:
        detail = f"; its last pod failed ({failure_summary(failures[-1], None)[1]}), retrying"
    elif pending is not None:
        detail = f" ({pending.reason}: {pending.message})".replace(": )", ")")
    else:
        detail = ""
    cond("Running", "False", PREFLIGHT_CHECKING, PREFLIGHT_WAIT + detail)
    return True


def _fail(
    cond: Any,
    status: dict[str, Any],
    plan: Plan,
    reason: str,
    message: str,
    now: datetime,
    job: dict[str, Any],
) -> None:
    cond("Failed", "True", reason, message)
    cond("Running", "False", "Failed", message)
    status["completionTime"] = rfc3339(now)
    # A Job the controller has not finished would keep starting pods: stop it. A finished one
    # stays (with its pods, for `kubectl logs`) until the resource is deleted.
    plan.delete_job = not job_finished(job)


def status_patch(
    current: dict[str, Any], desired: dict[str, Any], *, study: bool = False
) -> dict[str, Any]:
    """The merge patch of operator-owned status fields that differ; empty when none do.

    With `study` (a FineTuneJob with spec.search) `search`, `progress` and `artifacts` are the
    operator's too; otherwise they are the trainer's and never sent.
    """
    owned = OPERATOR_FIELDS + (STUDY_FIELDS if study else ())
    return {k: v for k, v in desired.items() if k in owned and current.get(k) != v}
