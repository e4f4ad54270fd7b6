"""Pure: what a trainer pod says about its attempt (pending, running, succeeded, failed by the
trainer's own fault, or lost to a disruption), and how a failure is worded.

A pod that ended left its `graft.contract.TrainerOutcome` as its termination message; a pod that
crashed before writing one left plain text, which is shown as it is."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from graft.contract import TrainerOutcome, decode_termination
from graft.controller.planner import TRAINER_CONTAINER
from graft.exit_codes import EXIT_INVALID_INPUT, EXIT_UNTRUSTED_STORAGE

# Pod-level reasons that mean the pod was lost, not that the trainer failed: retried without
# counting toward backoffLimit, and the new pod resumes from the last checkpoint.
DISRUPTION_REASONS = frozenset(
    {
        "Evicted",
        "Preempted",
        "Preempting",
        "NodeLost",
        "NodeShutdown",
        "Shutdown",
        "Terminated",
        "NodeAffinity",
        "UnexpectedAdmissionError",
        "OutOfcpu",
        "OutOfmemory",
        "OutOfpods",
    }
)

OOM_ADVICE = (
    "lower training.perDeviceTrainBatchSize (raise gradientAccumulationSteps to keep the "
    "effective batch), enable training.gradientCheckpointing, or use method qlora"
)

PodKind = Literal["pending", "running", "succeeded", "failed", "disrupted"]


@dataclasses.dataclass(frozen=True)
class PodOutcome:
    """What one trainer pod tells about its attempt."""

    name: str
    kind: PodKind
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    # What the trainer said when it ended (its termination message), when it said it in the
    # contract's form; `message` is then the outcome's message.
    outcome: TrainerOutcome | None = None

    @property
    def oom(self) -> bool:
        return self.reason == "OOMKilled"


def _trainer_state(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == TRAINER_CONTAINER:
            return dict(status)
    return {}


def _said(terminated: dict[str, Any] | None) -> tuple[TrainerOutcome | None, str]:
    """The trainer's outcome in a termination message, and the line to show of it."""
    text = str((terminated or {}).get("message") or "").strip()
    outcome = decode_termination(text)
    return outcome, (outcome.message if outcome is not None else text)


def classify_pod(pod: dict[str, Any]) -> PodOutcome:
    """Sort a pod into pending/running/succeeded/failed (the trainer's fault)/disrupted."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = str(meta.get("name", ""))
    phase = status.get("phase") or "Pending"
    container = _trainer_state(pod)
    terminated = (container.get("state") or {}).get("terminated") or (
        container.get("lastState") or {}
    ).get("terminated")
    if phase == "Succeeded":
        outcome, message = _said(terminated)
        return PodOutcome(name, "succeeded", message=message, exit_code=0, outcome=outcome)
    pod_reason = str(status.get("reason") or "")
    if meta.get("deletionTimestamp"):
        return PodOutcome(name, "disrupted", pod_reason or "Deleted", "the pod was deleted")
    if phase == "Failed":
        if pod_reason in DISRUPTION_REASONS or not terminated:
            message = str(status.get("message") or f"the pod was lost ({pod_reason or 'unknown'})")
            return PodOutcome(name, "disrupted", pod_reason or "PodLost", message)
        code = terminated.get("exitCode")
        reason = str(terminated.get("reason") or "")
        failure, text = _said(terminated)
        exit_code = int(code) if code is not None else None
        return PodOutcome(name, "failed", reason, text, exit_code, failure)
    if phase == "Running":
        return PodOutcome(name, "running")
    waiting = (container.get("state") or {}).get("waiting") or {}
    if waiting.get("reason"):
        return PodOutcome(
            name, "pending", str(waiting["reason"]), str(waiting.get("message") or "")
        )
    for cond in status.get("conditions") or []:
        # The scheduler's verdict, e.g. "0/3 nodes are available: 3 Insufficient cpu."
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return PodOutcome(
                name,
                "pending",
                str(cond.get("reason") or "Unschedulable"),
                str(cond.get("message") or "no node can run the pod"),
            )
    return PodOutcome(name, "pending")


def failure_summary(outcome: PodOutcome, memory: str | None = None) -> tuple[str, str]:
    """(reason, message) of a trainer failure, with advice for out-of-memory kills."""
    if outcome.oom:
        limit = f" (memory limit {memory})" if memory else ""
        return "OOMKilled", f"pod {outcome.name} was killed for running out of memory{limit}: " + (
            OOM_ADVICE
        )
    if outcome.exit_code == EXIT_INVALID_INPUT:
        reason = outcome.outcome.reason if outcome.outcome is not None else None
        text = outcome.message or "no reason given"
        if reason is not None and reason != "InvalidInput":  # an export check that failed
            return reason, f"{text} (exit code 2)"
        return "InvalidInput", f"the trainer refused its input (exit code 2): {text}"
    if outcome.exit_code == EXIT_UNTRUSTED_STORAGE:
        text = outcome.message or "no reason given"
        return (
            "IntegrityCheckFailed",
            f"a stored file cannot be trusted, nothing from it was loaded (exit code 3): {text}",
        )
    text = outcome.message or (
        f"exit code {outcome.exit_code}, no message (see kubectl logs pod/{outcome.name})"
    )
    return "TrainerFailed", f"pod {outcome.name} failed: {text}"
