"""The contract between the operator and a trainer pod, in one place.

The operator hands a trainer pod the resource as it launched it (`resource.json` in the spec
ConfigMap) and the environment named below. The trainer hands back:

- while it runs, progress records on stdout (one JSON object per line, `"event": "progress"`),
  which the operator reads from the pod's own log (`controller.progress_log`): only the pod of a
  resource's Job can speak for that resource, and the trainer needs no API permission at all;
- when it ends, its exit code (`graft.exit_codes`) and a `TrainerOutcome` as the pod's
  termination message (at most 4 KiB, `encode_termination`); the whole outcome is also written
  beside the artifacts (`OUTCOME_FILE`) for people and `graft run`.

The operator alone writes status. It takes from an outcome only what the kind's status model
accepts and only from the pod of the resource's own Job, so nothing a trainer says decides which
resource succeeds: the exit code and the Job's own conditions do.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from graft.api.base import ApiModel
from graft.api.bundle import AdapterReport, BundleArtifacts
from graft.api.finetune import (
    FineTuneArtifacts,
    FineTuneMetrics,
    FineTuneProgress,
    TrainingWarning,
)
from graft.api.optimize import Generation, OptimizeArtifacts, OptimizeMetrics

# The environment of a trainer pod (set by controller.planner, read by graft_trainer).
ENV_ARTIFACTS_URI = "GRAFT_ARTIFACTS_URI"
ENV_REPORTER = "GRAFT_REPORTER"
ENV_TRIAL = "GRAFT_TRIAL"
ENV_METRICS_PORT = "GRAFT_TRAINER_METRICS_PORT"
# A multi-node job (spec.resources.nodes > 1): how many pods train together, this pod's place
# among them (0: the pod whose first process is global rank 0, which evaluates, checkpoints
# and publishes), and where rank 0's pod serves the torch.distributed rendezvous (a TCPStore:
# a host name or IP, and a port).
ENV_NODES = "GRAFT_NODES"
ENV_NODE_RANK = "GRAFT_NODE_RANK"
ENV_RENDEZVOUS_ADDR = "GRAFT_RENDEZVOUS_ADDR"
ENV_RENDEZVOUS_PORT = "GRAFT_RENDEZVOUS_PORT"

# The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096
TERMINATION_LOG = "/dev/termination-log"
# The whole outcome, beside the artifacts (written after them).
OUTCOME_FILE = "outcome.json"
# `"event"` of a progress record on the trainer's stdout.
PROGRESS_EVENT = "progress"

# The status fields an outcome fills, per kind (the operator writes the rest too).
OUTCOME_FIELDS: dict[str, tuple[str, ...]] = {
    "FineTuneJob": ("artifacts", "metrics", "warnings", "progress"),
    "OptimizeJob": ("artifacts", "metrics", "generations"),
    "AdapterBundle": ("artifacts", "adapters"),
}

# Why an OptimizeJob or AdapterBundle export may be refused (the export stages' ExportError).
# The operator takes a reason from this list only, and only with exit code 2.
TRAINER_REASONS = frozenset(
    {
        "InvalidInput",
        "AdapterMismatch",
        "BaseModelMismatch",
        "DeviceUnavailable",
        "ParityExceeded",
        "ParityNotMeasured",
        "SmokeTestFailed",
        "UnsupportedArchitecture",
        "UnsupportedPrecision",
    }
)

Kind = Literal["FineTuneJob", "OptimizeJob", "AdapterBundle"]


class TrialRecord(ApiModel):
    """One finished trial of a FineTuneJob's search, as its pod reports it."""

    trial: int = Field(ge=0, description="Trial number.")
    state: Literal["Complete", "Pruned", "Failed"] = Field(description="How the trial ended.")
    value: float | None = Field(default=None, description="Objective (eval loss or metric).")
    step: int | None = Field(default=None, ge=0, description="Step the value was measured at.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters tried.")
    adapter: str | None = Field(default=None, description="The trial's adapter URI.")
    message: str | None = Field(default=None, max_length=300, description="Why it ended.")


class TrainerOutcome(ApiModel):
    """What a trainer pod says about its run when it ends."""

    kind: Kind = Field(description="The resource kind the pod ran.")
    state: Literal["Succeeded", "Failed"] = Field(description="How the run ended.")
    reason: str | None = Field(
        default=None, description="CamelCase reason of a failure (TRAINER_REASONS)."
    )
    message: str = Field(default="", description="One line for the resource's condition.")
    artifacts: dict[str, Any] = Field(
        default_factory=dict, description="Artifact URIs, as the kind's status.artifacts."
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Final metrics, as the kind's status.metrics."
    )
    warnings: list[TrainingWarning] = Field(
        default_factory=list, description="What a person should look at (FineTuneJob)."
    )
    progress: FineTuneProgress | None = Field(
        default=None, description="How far training came (FineTuneJob)."
    )
    generations: list[Generation] = Field(
        default_factory=list, description="Smoke-test generations (OptimizeJob)."
    )
    adapters: list[AdapterReport] = Field(
        default_factory=list, description="Per-adapter contract results (AdapterBundle)."
    )
    trial: TrialRecord | None = Field(default=None, description="A search trial's record.")
    truncated: bool = Field(
        default=False,
        description="Parts were left out to fit the termination message; OUTCOME_FILE has all.",
    )

    @model_validator(mode="after")
    def _typed_fields(self) -> TrainerOutcome:
        """artifacts and metrics must be what the kind's status accepts."""
        artifacts_model, metrics_model = _FIELD_MODELS[self.kind]
        artifacts_model.model_validate(self.artifacts)
        if metrics_model is not None:
            metrics_model.model_validate(self.metrics)
        elif self.metrics:
            raise ValueError(f"{self.kind} has no status.metrics")
        if self.reason is not None and self.reason not in TRAINER_REASONS:
            raise ValueError(f"reason {self.reason!r} is not one a trainer may report")
        return self

    def status_fields(self) -> dict[str, Any]:
        """The status fields this outcome fills for its kind (camelCase, unset ones left out)."""
        fields: dict[str, Any] = {}
        if self.artifacts:
            fields["artifacts"] = dict(self.artifacts)
        if self.metrics:
            fields["metrics"] = dict(self.metrics)
        if self.kind == "FineTuneJob":
            fields["warnings"] = [w.to_api() for w in self.warnings]
            if self.progress is not None:
                fields["progress"] = self.progress.to_api()
        elif self.kind == "OptimizeJob":
            fields["generations"] = [g.to_api() for g in self.generations]
        else:
            fields["adapters"] = [a.to_api() for a in self.adapters]
        return fields


_FIELD_MODELS: dict[str, tuple[type[ApiModel], type[ApiModel] | None]] = {
    "FineTuneJob": (FineTuneArtifacts, FineTuneMetrics),
    "OptimizeJob": (OptimizeArtifacts, OptimizeMetrics),
    "AdapterBundle": (BundleArtifacts, None),
}


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=float)


def _fits(data: dict[str, Any], limit: int) -> bool:
    return len(_compact(data).encode()) <= limit


def encode_termination(outcome: TrainerOutcome, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The outcome as a termination message of at most `limit` bytes.

    What status needs most goes last: generations first, then the adapters' generations, the
    warnings' wording and the message are shortened until it fits (`truncated` says so).
    """
    data = outcome.to_api()
    if _fits(data, limit):
        return _compact(data)
    data["truncated"] = True
    data.pop("generations", None)
    for adapter in data.get("adapters") or []:
        adapter.pop("generations", None)
    for warning in data.get("warnings") or []:
        warning["message"] = warning["message"][:200]
    while not _fits(data, limit) and len(data.get("message") or "") > 64:
        data["message"] = data["message"][: len(data["message"]) // 2] + "…"
    if not _fits(data, limit):  # the URIs alone are too long: say where the whole outcome is
        data = {k: data[k] for k in ("kind", "state", "reason", "message", "trial") if k in data}
        data["truncated"] = True
    text = _compact(data)
    while len(text.encode()) > limit:  # a message of multi-byte characters
        data["message"] = str(data.get("message", ""))[:-8]
        text = _compact(data)
    return text


def decode_termination(text: str, kind: str | None = None) -> TrainerOutcome | None:
    """The outcome in a termination message, or None when the text is not one (a crash before
    the trainer wrote it) or names another kind than `kind`."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        outcome = TrainerOutcome.model_validate_json(text)
    except (ValidationError, ValueError):
        return None
    return outcome if kind is None or outcome.kind == kind else None


def progress_record(line: str) -> dict[str, Any] | None:
    """A progress record from one line of the trainer's stdout, or None."""
    line = line.strip()
    if not line.startswith("{") or f'"{PROGRESS_EVENT}"' not in line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("event") != PROGRESS_EVENT:
        return None
    return record
