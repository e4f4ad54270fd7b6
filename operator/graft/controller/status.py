"""Pure status computation: conditions, phase and run bookkeeping from what the cluster shows.

Owns every status field: `conditions` (Validated, Running, Succeeded, Failed, Suspended,
Ready, Degraded), `phase`, `observedGeneration`, `startTime`, `completionTime`, `attempts`,
`jobName`, and what the trainer's pods say (`progress`, `metrics`, `warnings`, `artifacts`, an
export's `generations` and `adapters`), taken from the outcome in the termination message of
the Job's succeeded pod, or while it runs from the newest progress record of its log
(graft.contract). Nothing the trainer says decides a condition other than Degraded.

Level-based: the result depends only on the resource (spec and the previous status, for
transition times and the terminal outcome, which outlives the deleted Job), the Job, its pods
and the clock. Calling it twice with the same input gives the same answer.

`compute_status` runs an ordered chain of small rules per kind (`RULES`, at the end): each one
looks at a `Run` and either decides or passes on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from graft.api.errors import FieldIssue
from graft.contract import OUTCOME_FIELDS
from graft.controller import gang
from graft.controller.conditions import find_condition, is_true, true_condition
from graft.controller.planner import (
    ANNOTATION_SPEC_HASH,
    KIND,
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
from graft.controller.study import StudyPlan, TrialObserved, plan_study
from graft.exit_codes import NOT_RETRIED
from graft.policy import GpuBudget, PolicyIssue

CONDITION_TYPES = (
    "Validated",
    "Running",
    "Succeeded",
    "Failed",
    "Suspended",
    "Ready",
    "Degraded",
)
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
    "failedAttempts",
    "jobName",
)
# A search's fields, from its trial pods' outcomes.
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
    # A multi-node job of the per-node shape (controller.gang): the Jobs of these nodes, told
    # node 0's address `rendezvous`.
    create_node_jobs: list[int] = dataclasses.field(default_factory=list)
    rendezvous: str | None = None
    delete_job: bool = False  # for a search: every unfinished trial Job; a gang: every Job
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
    pods: tuple[dict[str, Any], ...] = ()  # of the Job (and of a gang's per-node Jobs)
    nodes: int = 1  # pods of one attempt (spec.resources.nodes)
    node_jobs: tuple[dict[str, Any], ...] = ()  # a gang's per-node Jobs, nodes 1..n-1
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
    # A running FineTuneJob's newest progress record from its pod's log, as status fields
    # (controller.progress_log); None: not read, or none there.
    progress: dict[str, Any] | None = None


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
            (type_ in ("Failed", "Degraded") and cond["status"] == "True")
            or (type_ == "Validated" and cond["status"] == "False")
            or cond["reason"] in ("Restarting", "Retrying")
        )
        events.append(
            Event("Warning" if warning else "Normal", str(cond["reason"]), str(cond["message"]))
        )
    return events


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


def job_finished(job: dict[str, Any]) -> bool:
    return true_condition(job, "Complete") is not None or true_condition(job, "Failed") is not None


def status_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The merge patch of the status fields that differ; empty when none do (every status
    field is the operator's). Within a field, a key the operator did not compute is deleted
    (null): a merge patch keeps what it does not name, and a key someone else wrote into an
    object (`search.best`, a metric) must not outlive the operator's next write."""
    return {k: _merge_diff(current.get(k), v) for k, v in desired.items() if current.get(k) != v}


def _merge_diff(current: Any, desired: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `current` into `desired`."""
    if not (isinstance(current, dict) and isinstance(desired, dict)):
        return desired
    patch: dict[str, Any] = {k: None for k in current if k not in desired}
    for k, v in desired.items():
        if current.get(k) != v:
            patch[k] = _merge_diff(current.get(k), v)
    return patch


# --- compute_status: an ordered chain of small rules per kind ------------------------------
#
# Each rule looks at a `Run` (the resource, what the reconciler saw, the clock, and the status
# and plan built so far) and either decides (sets the conditions that settle this pass and
# returns True: later rules do not run) or passes on (returns False, possibly after setting a
# condition that later rules build on). The first rule that decides ends the chain; `_finish`
# then derives the phase and the Events. Rules are pure like the rest of this module.


@dataclasses.dataclass
class Run:
    """A typed view of one status computation: its inputs and the status and plan being built."""

    obj: dict[str, Any]
    observed: Observed
    now: datetime
    prev: dict[str, Any]  # the previous status
    before: list[dict[str, Any]]  # the previous conditions
    generation: int
    kind: str
    launched: bool  # a Job, a spec ConfigMap or a trial Job exists (or existed)
    plan: Plan
    conds: list[dict[str, Any]]  # the conditions so far

    @classmethod
    def start(cls, obj: dict[str, Any], observed: Observed, now: datetime) -> Run:
        prev: dict[str, Any] = dict(obj.get("status") or {})
        generation = int(obj["metadata"].get("generation") or 1)
        launched = observed.launched_hash is not None or observed.job is not None
        if observed.study is not None:
            launched = launched or bool(observed.study.trials)
        kind = kind_of(obj)
        kept = OPERATOR_FIELDS + (STUDY_FIELDS if observed.study else OUTCOME_FIELDS.get(kind, ()))
        status: dict[str, Any] = {k: prev[k] for k in kept if k in prev}
        status["observedGeneration"] = generation
        before: list[dict[str, Any]] = list(prev.get("conditions") or [])
        return cls(
            obj=obj,
            observed=observed,
            now=now,
            prev=prev,
            before=before,
            generation=generation,
            kind=kind,
            launched=launched,
            plan=Plan(status=status),
            conds=before,
        )

    @property
    def spec(self) -> dict[str, Any]:
        return self.obj.get("spec") or {}

    @property
    def status(self) -> dict[str, Any]:
        return self.plan.status

    @property
    def job(self) -> dict[str, Any]:
        """The trainer Job: the rules after `_launch` run only once it exists."""
        assert self.observed.job is not None
        return self.observed.job

    @functools.cached_property
    def outcomes(self) -> list[PodOutcome]:
        """What each pod of the Job shows, oldest first."""
        return [classify_pod(p) for p in self.observed.pods]

    @functools.cached_property
    def study(self) -> StudyPlan | None:
        """A searched FineTuneJob's study as its trial pods and the last status's records of
        trials whose pods are gone show it (None: no search)."""
        observed = self.observed.study
        if observed is None:
            return None
        return plan_study(
            observed.spec,
            observed.prefix,
            self.prev.get("search"),
            list(observed.trials),
            self.observed.backoff_limit,
            self.obj["metadata"]["name"],
        )

    @functools.cached_property
    def failures(self) -> list[PodOutcome]:
        return sorted((o for o in self.outcomes if o.kind == "failed"), key=lambda o: o.name)

    @property
    def refusal(self) -> str:
        """Why the current spec is refused: the platform's rules (a spec edit can still fix
        it), or the API's."""
        policy = any(isinstance(i, PolicyIssue) for i in self.observed.issues)
        return "PolicyDenied" if policy else "InvalidSpec"

    @property
    def issues_text(self) -> str:
        return "; ".join(str(i) for i in self.observed.issues)

    def cond(self, type_: str, value: Literal["True", "False"], reason: str, message: str) -> None:
        self.conds = set_condition(
            self.conds, type_, value, reason, message, generation=self.generation, now=self.now
        )


Rule = Callable[[Run], bool]


def _first(run: Run, rules: Iterable[Rule]) -> bool:
    """Run `rules` in order until one decides; whether one did."""
    return any(rule(run) for rule in rules)


def compute_status(obj: dict[str, Any], observed: Observed, now: datetime) -> Plan:
    """The operator-owned status of `obj` and the actions that make the cluster match it."""
    run = Run.start(obj, observed, now)
    _first(run, RULES.get(run.kind, RULES[KIND]))
    return _finish(run)


def _finish(run: Run) -> Plan:
    """The kind's closing rules (whatever decided), the phase and the Events."""
    for rule in CLOSING_RULES.get(run.kind, ()):
        rule(run)
    run.status["conditions"] = run.conds
    run.status["phase"] = derive_phase(run.conds)
    run.plan.events = _events(run.before, run.conds) + run.plan.events
    return run.plan


# --- Validated: the current spec, and whether it still matches what was launched ------------


def _validated(run: Run) -> bool:
    """Sets Validated and passes on."""
    _first(run, VALIDATED_RULES)
    return False


def _invalid_spec(run: Run) -> bool:
    if not run.observed.issues:
        return False
    suffix = " (the launched spec keeps running)" if run.launched else ""
    run.cond("Validated", "False", run.refusal, run.issues_text + suffix)
    return True


def _spec_changed(run: Run) -> bool:
    observed = run.observed
    if not run.launched or observed.launched_hash in (None, observed.current_hash):
        return False
    fields = ", ".join(observed.changed) or "the spec"
    run.cond(
        "Validated",
        "False",
        "SpecChangeRefused",
        f"{fields} changed after the Job was created and is ignored: only spec.suspend and "
        "spec.ttlSecondsAfterFinished take effect once a run started. Revert the change, "
        "or create a new resource.",
    )
    return True


def _preflight_finding(run: Run) -> bool:
    """What the pre-flight pod found stays the word on the spec it checked."""
    checked = find_condition(run.before, "Validated") or {}
    if not (
        (checked.get("reason") == PREFLIGHT_PASSED and run.launched)
        or (checked.get("reason") == PREFLIGHT_FAILED and is_terminal(run.prev))
    ):
        return False
    run.cond("Validated", checked["status"], checked["reason"], str(checked.get("message") or ""))
    return True


def _valid(run: Run) -> bool:
    run.cond("Validated", "True", "Valid", "the spec is valid")
    return True


# --- Before the run: what ends, stops or holds back a launch --------------------------------


def _refused_before_launch(run: Run) -> bool:
    """An invalid (or denied) spec never launched: Failed until it is fixed."""
    if run.launched or not run.observed.issues:
        return False
    refusal = run.refusal
    not_launched = "nothing is launched until the spec is valid"
    if refusal == "PolicyDenied":
        not_launched = "nothing is launched until the spec meets the platform's policy"
    run.cond("Failed", "True", refusal, run.issues_text)
    run.cond("Running", "False", refusal, not_launched)
    run.cond("Succeeded", "False", refusal, not_launched)
    run.cond("Suspended", "False", "NotSuspended", "not suspended")
    return True


def _ended(run: Run) -> bool:
    """The outcome outlives the Job: a terminal status stays, until the TTL deletes it all,
    when what is left of the run bears it out (`_borne_out`)."""
    if not is_terminal(run.prev) or not _borne_out(run):
        return False
    succeeded = is_true(run.before, "Succeeded")
    run.cond("Running", "False", "Completed" if succeeded else "Failed", "the run has ended")
    if succeeded and run.study is not None and run.observed.study and run.observed.study.trials:
        # The best trial is what the trial pods reported, not what status says (an
        # OptimizeJob's gate takes it as the job's output).
        _study_fields(run, run.study)
    job = run.observed.job
    if not succeeded and job is not None and not job_finished(job):
        run.plan.delete_job = True
    _expire(run)
    return True


def _borne_out(run: Run) -> bool:
    """Whether a terminal status is one this operator could have written, given the children
    still there: Succeeded needs a complete Job; Failed a finished Job or a failed or lost pod;
    a search, no trial Job still running. A status someone else wrote over a running run is
    not: the rules after this one compute the status again from the cluster. With the Job
    gone there is nothing to contradict it, and it stays."""
    job = run.observed.job
    if job is not None:
        if is_true(run.before, "Succeeded"):
            return true_condition(job, "Complete") is not None
        return job_finished(job) or any(o.kind in ("failed", "disrupted") for o in run.outcomes)
    study = run.observed.study
    if study is not None:
        if not all(job_finished(t.job) for t in study.trials):
            return False
        if study.trials and is_true(run.before, "Succeeded"):
            # A search succeeded when its trials' records show a best trial.
            return run.study is not None and run.study.outcome == "succeeded"
        return True
    return True


def _expire(run: Run) -> None:
    """spec.ttlSecondsAfterFinished: delete the resource once due, else look again then."""
    ttl = run.spec.get("ttlSecondsAfterFinished")
    if ttl is None:
        return
    done = parse_time(run.status.get("completionTime")) or run.now
    due = done + timedelta(seconds=int(ttl))
    if run.now >= due:
        run.plan.delete_resource = True
        run.plan.events.append(
            Event("Normal", "TTLExpired", f"deleting the resource {ttl}s after it ended")
        )
    else:
        run.plan.requeue_after = (due - run.now).total_seconds()


def _not_ended(run: Run) -> bool:
    """Not terminal: Failed and Succeeded are False (a recoverable failure is lifted)."""
    if find_condition(run.conds, "Failed") is None or is_true(run.conds, "Failed"):
        run.cond("Failed", "False", "NotFailed", "no failure")
    if find_condition(run.conds, "Succeeded") is None or is_true(run.conds, "Succeeded"):
        run.cond("Succeeded", "False", "NotFinished", "not finished")
    return False


def _suspended(run: Run) -> bool:
    if not run.spec.get("suspend"):
        return False
    study = run.observed.study
    if run.observed.job is not None or (study is not None and study.trials):
        run.plan.delete_job = True
    run.cond(
        "Suspended",
        "True",
        "Suspended",
        "spec.suspend is true: the trainer pod is stopped and checkpoints are kept; "
        "setting it to false resumes from the last checkpoint",
    )
    run.cond("Running", "False", "Suspended", "suspended")
    return True


def _not_suspended(run: Run) -> bool:
    if is_true(run.before, "Suspended"):
        run.cond(
            "Suspended",
            "False",
            "Resumed",
            "resumed: the new pod continues from the last checkpoint",
        )
    elif find_condition(run.conds, "Suspended") is None:
        run.cond("Suspended", "False", "NotSuspended", "not suspended")
    return False


def _source_gate(run: Run) -> bool:
    """The FineTuneJobs a resource not launched yet references: waiting, or unusable."""
    gate = run.observed.source
    if run.launched or gate is None or gate.state == "ready":
        return False
    if gate.state == "waiting":
        run.cond("Running", "False", gate.reason, gate.message)
        run.plan.requeue_after = 30.0  # the FineTuneJob's own events usually come first
    else:
        run.cond("Failed", "True", gate.reason, gate.message)
        run.cond(
            "Running", "False", gate.reason, "nothing is launched until the sources are usable"
        )
    return True


def _wait_for_gpus(run: Run) -> bool:
    """A launch over the namespace's GPU budget waits."""
    budget = run.observed.gpu_budget
    if run.observed.job is not None or budget is None or run.observed.gpus <= budget.free:
        return False
    run.cond("Running", "False", GPU_WAIT_REASON, budget.wait_message(run.observed.gpus))
    run.plan.requeue_after = GPU_WAIT_REQUEUE
    return True


def _launch(run: Run) -> bool:
    if run.observed.job is not None:
        return False
    run.plan.create_job = True
    run.cond("Running", "False", "Launching", "creating the trainer Job")
    return True


# --- A GPU FineTuneJob's pre-flight pod, before the GPU Job is created ----------------------


def _preflight(run: Run) -> bool:
    """The pre-flight step; decides while it holds the launch back (checking, or failed),
    passes on once it passed and the GPU pod may be created."""
    pre = run.observed.preflight
    if pre is None or run.launched:
        return False
    job = pre.job
    if job is None:
        run.plan.create_preflight = True
        run.cond("Running", "False", PREFLIGHT_CHECKING, PREFLIGHT_WAIT)
        return True
    if (job["metadata"].get("annotations") or {}).get(
        ANNOTATION_SPEC_HASH
    ) != run.observed.current_hash:
        # The spec changed before the GPU pod was created: the new one is checked anew.
        run.plan.delete_preflight, run.plan.requeue_after = True, 2.0
        run.cond("Running", "False", PREFLIGHT_CHECKING, "the spec changed; " + PREFLIGHT_WAIT)
        return True
    outcomes = [classify_pod(p) for p in pre.pods]
    passed = next((o for o in outcomes if o.kind == "succeeded"), None)
    if passed is not None or true_condition(job, "Complete") is not None:
        findings = passed.message if passed is not None and passed.message else "passed"
        run.cond("Validated", "True", PREFLIGHT_PASSED, findings)
        return False
    if _preflight_failed(run, job, outcomes):
        return True
    _preflight_checking(run, outcomes)
    return True


def _preflight_failed(run: Run, job: dict[str, Any], outcomes: list[PodOutcome]) -> bool:
    """A pre-flight pod refused the spec, or its Job gave up: the resource fails holding no GPU."""
    failures = [o for o in outcomes if o.kind == "failed"]
    refused = next((o for o in failures if o.exit_code in NOT_RETRIED), None)
    gave_up = true_condition(job, "Failed")
    if refused is None and gave_up is None:
        return False
    last = refused or (failures[-1] if failures else None)
    if last is not None:
        reason, message = failure_summary(last, None)
    else:  # no failed pod to read: the deadline, or pods lost
        reason = str(gave_up.get("reason") if gave_up else "") or "PreflightFailed"
        message = str(gave_up.get("message") if gave_up else "") or "the pre-flight Job failed"
    message = f"pre-flight pod, before any GPU was requested: {message}"
    run.cond("Validated", "False", PREFLIGHT_FAILED, message)
    _fail(run, reason, message, job)
    run.plan.delete_job = False
    run.plan.delete_preflight = not job_finished(job)  # no second pod for the same finding
    return True


def _preflight_checking(run: Run, outcomes: list[PodOutcome]) -> None:
    failures = [o for o in outcomes if o.kind == "failed"]
    pending = next((o for o in outcomes if o.kind == "pending" and o.reason), None)
    if failures:
        detail = f"; its last pod failed ({failure_summary(failures[-1], None)[1]}), retrying"
    elif pending is not None:
        detail = f" ({pending.reason}: {pending.message})".replace(": )", ")")
    else:
        detail = ""
    run.cond("Running", "False", PREFLIGHT_CHECKING, PREFLIGHT_WAIT + detail)


# --- A searched FineTuneJob: its trials (see `study`) ---------------------------------------


def _study(run: Run) -> bool:
    observed, study = run.observed, run.study
    if observed.study is None or study is None:
        return False
    status = run.status
    _study_fields(run, study)
    status["attempts"] = max(int(status.get("attempts") or 0), study.pods)
    held_back = _launch_trials(run, study.launch)
    if observed.study.trials and not status.get("startTime"):
        status["startTime"] = rfc3339(run.now)
    _study_conditions(run, study, held_back)
    return True


def _study_fields(run: Run, study: StudyPlan) -> None:
    """A search's fields from its study: the best trial's artifacts once it is done, none
    before (null deletes a field someone else wrote in the merge patch)."""
    run.status["search"] = study.search
    run.status["progress"] = study.progress
    if study.artifacts is not None:
        run.status["artifacts"] = study.artifacts
    elif "artifacts" in run.prev:
        run.status["artifacts"] = None


def _launch_trials(run: Run, wanted: list[int]) -> int:
    """The trials to create now, as many as the GPU budget allows; how many wait."""
    run.plan.create_trials = wanted
    budget, gpus = run.observed.gpu_budget, run.observed.gpus
    if budget is None or not gpus or not wanted:
        return 0
    fits = budget.free // gpus
    held_back = max(0, len(wanted) - fits)
    run.plan.create_trials = wanted[:fits]
    if held_back:
        run.plan.requeue_after = GPU_WAIT_REQUEUE
    return held_back


def _study_conditions(run: Run, study: StudyPlan, held_back: int) -> None:
    if study.outcome == "succeeded":
        run.cond("Succeeded", "True", "Completed", f"search finished: {study.message}")
        run.cond("Running", "False", "Completed", f"search finished: {study.message}")
        run.status["completionTime"] = rfc3339(run.now)
    elif study.outcome == "failed":
        run.cond("Failed", "True", "AllTrialsFailed", f"the search failed: {study.message}")
        run.cond("Running", "False", "Failed", f"the search failed: {study.message}")
        run.status["completionTime"] = rfc3339(run.now)
    elif held_back and not run.plan.create_trials and not study.active:
        budget = run.observed.gpu_budget
        assert budget is not None
        run.cond("Running", "False", GPU_WAIT_REASON, budget.wait_message(run.observed.gpus))
    else:
        waiting = f"; {held_back} trials wait for GPUs" if held_back else ""
        run.cond("Running", "True", "TrialsRunning", study.message + waiting)


# --- The trainer Job: what it and its pods show ---------------------------------------------


def _job_seen(run: Run) -> bool:
    """Bookkeeping of a created Job (its name, attempts, start time); passes on."""
    job, status = run.job, run.status
    status["jobName"] = job["metadata"]["name"]
    seen = max(len(run.outcomes), run.observed.pods_seen or 0)
    if run.observed.nodes > 1:  # an attempt of a gang is all its pods
        seen = min(seen, 1)
    status["attempts"] = max(int(run.prev.get("attempts") or 0), attempts_before(job) + seen)
    if not status.get("startTime"):
        started = (job.get("status") or {}).get("startTime")
        if started or run.outcomes:
            status["startTime"] = started or rfc3339(run.now)
    return False


def _trainer_refused(run: Run) -> bool:
    """A pod exited with a code that is never retried (an invalid spec, data or model)."""
    invalid = [o for o in run.failures if o.exit_code in NOT_RETRIED]
    if not invalid:
        return False
    _fail(run, *failure_summary(invalid[0], run.observed.memory), run.job)
    return True


def _completed(run: Run) -> bool:
    if true_condition(run.job, "Complete") is None:
        return False
    done = DONE_MESSAGES.get(run.kind, "finished")
    run.cond("Succeeded", "True", "Completed", done)
    run.cond("Running", "False", "Completed", done)
    completed = (run.job.get("status") or {}).get("completionTime")
    run.status["completionTime"] = completed or rfc3339(run.now)
    return True


def _gang(run: Run) -> bool:
    """A multi-node job (controller.gang): the attempt ends as a whole (every Job deleted, the
    next attempt resumes from the last checkpoint, or the job fails past backoffLimit); the
    per-node shape's other Jobs are created once node 0's pod has an IP; all pods must run."""
    nodes, job = run.observed.nodes, run.job
    if nodes <= 1 or true_condition(job, "Suspended") is not None:
        return False
    jobs = (job, *run.observed.node_jobs)
    end = gang.judge_attempt(
        nodes,
        run.outcomes,
        jobs_failed=[j["metadata"]["name"] for j in jobs if true_condition(j, "Failed")],
        unschedulable_since=gang.unschedulable_since(list(run.observed.pods)),
        now=run.now,
        pods_seen=run.observed.pods_seen,
    )
    if end is not None:
        failed = gang.failed_before(job) + int(end.counted)
        run.status["failedAttempts"] = max(int(run.prev.get("failedAttempts") or 0), failed)
        limit = run.observed.backoff_limit
        if failed > limit:
            message = f"{failed} failed attempts (backoffLimit {limit}); last: {end.message}"
            _fail(run, "BackoffLimitExceeded", message, job)
        else:
            run.cond(
                "Running",
                "False",
                "Restarting",
                f"{end.message}; every pod of the {nodes} restarts from the last checkpoint",
            )
        run.plan.delete_job = True  # the other pods would wait on the lost one's collectives
        return True
    if gang.node_of(job) is not None and len(run.observed.node_jobs) < nodes - 1:
        address = gang.node0_address(list(run.observed.pods))
        if address is not None:
            have = {gang.node_of(j) for j in run.observed.node_jobs}
            run.plan.create_node_jobs = [n for n in range(1, nodes) if n not in have]
            run.plan.rendezvous = address
    running = [o for o in run.outcomes if o.kind == "running"]
    if not running or len(running) == nodes:
        return False  # none yet (queued, refused, pending), or training: the rules below
    waiting = next((o for o in run.outcomes if o.kind == "pending"), None)
    detail = (
        f"pod {waiting.name} is pending ({waiting.reason or 'starting'})"
        if waiting is not None
        else f"{nodes - len(running)} pod(s) are not created yet"
    )
    run.cond(
        "Running",
        "False",
        "WaitingForPods",
        f"{len(running)} of {nodes} pods run; {detail}: they train once all run",
    )
    return True


def _backoff_exceeded(run: Run) -> bool:
    failures, limit = run.failures, run.observed.backoff_limit
    if len(failures) <= limit:
        return False
    reason, message = failure_summary(failures[-1], run.observed.memory)
    if reason == "TrainerFailed":
        reason = "BackoffLimitExceeded"
    message = f"{len(failures)} failed attempts (backoffLimit {limit}); last: {message}"
    _fail(run, reason, message, run.job)
    return True


def _job_failed(run: Run) -> bool:
    """The Job controller gave up without a pod failure to read (deadline, disruptions)."""
    job_failed = true_condition(run.job, "Failed")
    if job_failed is None:
        return False
    reason = str(job_failed.get("reason") or "JobFailed")
    if reason == "DeadlineExceeded":
        deadline = (run.job.get("spec") or {}).get("activeDeadlineSeconds")
        message = (
            f"the attempt ran longer than its deadline ({deadline} s: "
            "spec.activeDeadlineSeconds, or the platform's default)"
        )
    elif reason == "BackoffLimitExceeded":
        reason = "TooManyDisruptions"
        message = "the pod was lost too often (evictions or node failures)"
    else:
        message = str(job_failed.get("message") or "the Job failed")
    _fail(run, reason, message, run.job)
    return True


def _queued(run: Run) -> bool:
    """Graft deletes its Jobs to suspend them: a suspended Job is a queue's (Kueue) hold."""
    if true_condition(run.job, "Suspended") is None or any(
        o.kind in ("running", "pending") for o in run.outcomes
    ):
        return False
    queue = (run.job["metadata"].get("labels") or {}).get(KUEUE_QUEUE)
    where = f"queue {queue}" if queue else "its queue"
    run.cond(
        "Running",
        "False",
        "Queued",
        f"the Job waits for {where} to admit it (the Job is suspended until then)",
    )
    return True


def _running(run: Run) -> bool:
    running = [o for o in run.outcomes if o.kind == "running"]
    if not running:
        return False
    if len(running) > 1:  # a multi-node job's pods
        names = ", ".join(o.name for o in running)
        run.cond("Running", "True", "TrainerRunning", f"pods {names} are training together")
    else:
        run.cond("Running", "True", "TrainerRunning", f"pod {running[0].name} is training")
    return True


def _finishing(run: Run) -> bool:
    if not any(o.kind == "succeeded" for o in run.outcomes):
        return False
    run.cond("Running", "False", "Finishing", "the trainer pod succeeded; the Job is finishing")
    return True


def _restarting(run: Run) -> bool:
    """A pod failed (within backoffLimit) or was lost: the Job makes a new one."""
    lost = [o for o in run.outcomes if o.kind in ("disrupted", "failed")]
    if not lost:
        return False
    last = lost[-1]
    if last.kind == "disrupted":
        detail = (
            f"pod {last.name} was lost ({last.reason}: {last.message}); it does not count "
            "toward backoffLimit"
        )
    else:
        detail = failure_summary(last, run.observed.memory)[1]
        detail += f" (attempt {len(run.failures)} of {run.observed.backoff_limit + 1})"
    run.cond(
        "Running", "False", "Restarting", f"{detail}; a new pod resumes from the last checkpoint"
    )
    return True


def _pod_refused(run: Run) -> bool:
    """No pod, and the Job controller says why it cannot create one."""
    if run.outcomes or not run.observed.pod_refused:
        return False
    run.cond(
        "Running",
        "False",
        POD_REFUSED,
        f"the Job controller cannot create the trainer pod: {run.observed.pod_refused}",
    )
    run.plan.requeue_after = POD_REFUSED_RECHECK
    return True


def _pod_pending(run: Run) -> bool:
    waiting = next((o for o in run.outcomes if o.kind == "pending" and o.reason), None)
    if waiting is not None:
        message = f"{waiting.reason}: {waiting.message}".rstrip(": ")
        run.cond("Running", "False", "PodPending", message)
    else:
        run.cond("Running", "False", "PodPending", "waiting for the trainer pod to start")
    return True


def _fail(run: Run, reason: str, message: str, job: dict[str, Any]) -> None:
    run.cond("Failed", "True", reason, message)
    run.cond("Running", "False", "Failed", message)
    run.status["completionTime"] = rfc3339(run.now)
    # A Job the controller has not finished would keep starting pods: stop it. A finished one
    # stays (with its pods, for `kubectl logs`) until the resource is deleted.
    run.plan.delete_job = not job_finished(job)


# --- Closing rules: conditions derived from the others, whatever decided --------------------


def _ready(run: Run) -> bool:
    """An AdapterBundle is Ready once it Succeeded: the trainer succeeds only if the contract
    (one base digest, adapter tensors matching the graph, smoke tests) passed."""
    conds = run.conds
    if is_true(conds, "Succeeded"):
        run.cond("Ready", "True", "BundleReady", "every adapter passed the compatibility checks")
        return True
    failed = find_condition(conds, "Failed")
    if failed is not None and failed.get("status") == "True":
        run.cond("Ready", "False", str(failed["reason"]), str(failed["message"]))
        return True
    running = find_condition(conds, "Running") or {}
    run.cond("Ready", "False", str(running.get("reason") or "NotReady"), "not built yet")
    return True


def _trainer_said(run: Run) -> bool:
    """What the trainer's pods say fills their fields: the outcome of the Job's succeeded pod,
    else, while the Job runs, the newest progress record of its log (or nothing); kept from
    the last pass once the run has ended (they outlive the pods). A search's fields come from
    `_study`."""
    if run.observed.study is not None:
        return False
    said = next(
        (
            o.outcome
            for o in run.outcomes
            if o.kind == "succeeded" and o.outcome is not None and o.outcome.kind == run.kind
        ),
        None,
    )
    if said is not None:
        run.status.update(said.status_fields())
    elif run.observed.job is not None and not is_terminal({"conditions": run.conds}):
        # A run under way shows what its pod's log says, or nothing: not what someone else
        # wrote (null deletes a field in the merge patch).
        live = run.observed.progress or {}
        for field in OUTCOME_FIELDS.get(run.kind, ()):
            if field in live:
                run.status[field] = live[field]
            elif field in run.prev:
                run.status[field] = None
    return False


def _degraded(run: Run) -> bool:
    """The trainer's warnings (overfitting, truncated samples, memory pressure, ...) as a
    condition `kubectl wait` can see, and a Warning Event when it turns True."""
    warnings = run.status.get("warnings") or []
    if warnings:
        first = str(warnings[0].get("type") or "Warning")
        text = "; ".join(str(w.get("message", "")) for w in warnings)
        run.cond("Degraded", "True", first, text)
    elif find_condition(run.conds, "Degraded") is not None:
        run.cond("Degraded", "False", "NoWarnings", "the trainer reports nothing to look at")
    return False


# --- The chains ------------------------------------------------------------------------------

VALIDATED_RULES: tuple[Rule, ...] = (_invalid_spec, _spec_changed, _preflight_finding, _valid)

# Every kind: the spec, a terminal outcome, suspension, the FineTuneJobs it references.
_BEFORE_LAUNCH: tuple[Rule, ...] = (
    _validated,
    _refused_before_launch,
    _ended,
    _not_ended,
    _suspended,
    _not_suspended,
    _source_gate,
)
# Every kind: the launch, then what the Job and its pods show, most final first.
_JOB: tuple[Rule, ...] = (
    _wait_for_gpus,
    _launch,
    _job_seen,
    _trainer_refused,
    _completed,
    _gang,
    _backoff_exceeded,
    _job_failed,
    _queued,
    _running,
    _finishing,
    _restarting,
    _pod_refused,
    _pod_pending,
)
RULES: dict[str, tuple[Rule, ...]] = {
    # The pre-flight pod and the search are a FineTuneJob's (the reconciler observes them for
    # no other kind); either decides before the trainer Job is considered.
    KIND: (*_BEFORE_LAUNCH, _preflight, _study, *_JOB),
    "OptimizeJob": (*_BEFORE_LAUNCH, *_JOB),
    "AdapterBundle": (*_BEFORE_LAUNCH, *_JOB),
}
# Run after the chain, whatever decided.
CLOSING_RULES: dict[str, tuple[Rule, ...]] = {
    KIND: (_trainer_said, _degraded),
    "OptimizeJob": (_trainer_said,),
    "AdapterBundle": (_trainer_said, _ready),
}
