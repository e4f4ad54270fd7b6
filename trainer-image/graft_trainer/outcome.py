"""The trainer's side of the contract's end: a `graft.contract.TrainerOutcome` for every way a
run ends, the pod's termination message, and the whole outcome beside the artifacts.

The trainer writes no status. The operator reads the termination message of the pod of the
resource's own Job and fills status from it (graft.contract).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from graft.contract import (
    OUTCOME_FILE,
    TERMINATION_LOG,
    TERMINATION_MESSAGE_LIMIT,
    TRAINER_REASONS,
    TrainerOutcome,
    TrialRecord,
    encode_termination,
)
from graft.exit_codes import EXIT_OK
from graft.progress import ProgressEvent, Reporter

log = logging.getLogger("graft_trainer")


@dataclass
class RunEnd:
    """How one run ended: the exit code, a line for people, and what the operator reads."""

    code: int
    message: str
    outcome: TrainerOutcome | None = None
    # A local study's status.search (`graft run`): what a referencing resource's gate reads.
    search: dict[str, Any] | None = None

    def to_json(self) -> str:
        """For a process that ran it to hand to the one that reports it (data parallel)."""
        said = self.outcome.to_api() if self.outcome is not None else None
        return json.dumps({"code": self.code, "message": self.message, "outcome": said})

    @classmethod
    def from_json(cls, text: str) -> RunEnd:
        data = json.loads(text)
        said = data.get("outcome")
        return cls(
            int(data["code"]),
            str(data["message"]),
            TrainerOutcome.model_validate(said) if said is not None else None,
        )


def _kind(document: dict[str, Any] | None) -> str:
    kind = (document or {}).get("kind")
    return kind if kind in ("FineTuneJob", "OptimizeJob", "AdapterBundle") else "FineTuneJob"


def failed(document: dict[str, Any] | None, code: int, message: str, reason: str = "") -> RunEnd:
    """A failure; `reason` only when it is one the operator takes (an export's own)."""
    outcome = TrainerOutcome(
        kind=_kind(document),  # type: ignore[arg-type]
        state="Failed",
        reason=reason if reason in TRAINER_REASONS else None,
        message=message,
    )
    return RunEnd(code, message, outcome)


def succeeded(document: dict[str, Any], message: str, fields: dict[str, Any]) -> RunEnd:
    """A finished run with its status fields (artifacts, metrics, ...) for the operator."""
    outcome = TrainerOutcome.model_validate(
        {"kind": _kind(document), "state": "Succeeded", "message": message, **fields}
    )
    return RunEnd(EXIT_OK, message, outcome)


def trial_finished(document: dict[str, Any], message: str, record: dict[str, Any]) -> RunEnd:
    """A search trial's pod: it succeeds whatever the trial's state; its record says the rest."""
    outcome = TrainerOutcome(
        kind=_kind(document),  # type: ignore[arg-type]
        state="Succeeded",
        message=message,
        trial=TrialRecord.model_validate(record),
    )
    return RunEnd(EXIT_OK, message, outcome)


def event_fields(event: ProgressEvent | None) -> dict[str, Any]:
    """A FineTuneJob's outcome fields from the last progress event of its run."""
    if event is None:
        return {}
    return {
        "artifacts": dict(event.artifacts),
        "metrics": event.metrics.to_api(),
        "warnings": [w.to_api() for w in event.warnings],
        "progress": event.progress.to_api(),
    }


class LastEventReporter:
    """Passes events on and keeps the last one: the run's final artifacts and metrics."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner
        self.last: ProgressEvent | None = None

    def report(self, event: ProgressEvent) -> None:
        self.last = event
        self.inner.report(event)

    def close(self) -> None:
        self.inner.close()


def termination_message(end: RunEnd) -> str:
    """What the pod leaves for the operator: the outcome, else the plain message."""
    from graft_trainer.redaction import redact, redact_strings

    if end.outcome is None:
        return redact(end.message)
    data = redact_strings(end.outcome.to_api())
    return encode_termination(TrainerOutcome.model_validate(data))


def write_termination_log(text: str, path: str | None = None) -> None:
    """The termination message the operator reads (the kubelet keeps at most 4 KiB; an
    encoded outcome already fits)."""
    from graft_trainer.redaction import redact

    data = redact(text).encode()[:TERMINATION_MESSAGE_LIMIT]
    try:
        with open(path or TERMINATION_LOG, "wb") as fh:
            fh.write(data.decode(errors="ignore").encode())
    except OSError:
        pass


def save_outcome(end: RunEnd, artifacts_uri: str) -> None:
    """The whole outcome beside the artifacts, for people and `graft run` (best effort: the
    operator reads the termination message)."""
    if end.outcome is None or not artifacts_uri:
        return
    from graft.storage import join_uri, open_store
    from graft_trainer.redaction import redact_strings

    try:
        body = json.dumps(redact_strings(end.outcome.to_api()), indent=2, default=float)
        open_store(artifacts_uri).write_bytes(join_uri(artifacts_uri, OUTCOME_FILE), body.encode())
    except Exception as exc:
        log.warning("could not write %s beside the artifacts: %s", OUTCOME_FILE, exc)
