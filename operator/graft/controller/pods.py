"""Pure: what a trainer pod says about its attempt (pending, running, succeeded, failed by the
trainer's own fault, or lost to a disruption), and how a failure is worded."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from graft.controller.planner import TRAINER_CONTAINER
from graft.exit_codes import EXIT_INVALID_INPUT, EXIT_UNTRUSTED_STORAGE
from graft.outcome import parse_failure

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

    @property
    def oom(self) -> bool:
        return self.reason == "OOMKilled"


def _trainer_state(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == TRAINER_CONTAINER:
            return dict(status)
    return {}


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
    if phase == "Succeeded":  # a search trial's outcome is its termination message
        message = str((terminated or {}).get("message") or "").strip()
        return PodOutcome(name, "succeeded", message=message, exit_code=0)
    pod_reason = str(status.get("reason") or "")
    if meta.get("deletionTimestamp"):
        return PodOutcome(name, "disrupted", pod_reason or "Deleted", "the pod was deleted")
    if phase == "Failed":
        if pod_reason in DISRUPTION_REASONS or not terminated:
            message = str(status.get("message") or f"the pod was lost ({pod_reason or 'unknown'})")
            return PodOutcome(name, "disrupted", pod_reason or "PodLost", message)
        code = terminated.get("exitCode")
        reason = str(terminated.get("reason") or "")
        message = str(terminated.get("message") or "").strip()
        return PodOutcome(name, "failed", reason, message, int(code) if code is not None else None)
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
        reason, text = parse_failure(outcome.message or "no reason given")
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
