"""Pure: a running FineTuneJob's live progress, from its trainer pod's own log.

The trainer prints a progress record (graft.contract.progress_record) to stdout as it trains;
the operator reads the tail of the log of the pod of the resource's own Job every
`GRAFT_PROGRESS_SECONDS` and shows the newest record in status. A pod can speak only for the
resource whose Job made it, the trainer needs no API permission to be heard, and a record
that does not fit the status models is ignored: progress informs people and decides nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from graft.api.finetune import FineTuneArtifacts, FineTuneMetrics, FineTuneProgress, TrainingWarning
from graft.contract import progress_record

# Lines of the log read per look: progress records come every few seconds, log lines between.
TAIL_LINES = 40
# Fields a FineTuneJob's running trainer fills (its outcome fills them again when it ends).
PROGRESS_FIELDS = ("progress", "metrics", "warnings", "artifacts")


def latest_progress(log_tail: str) -> dict[str, Any] | None:
    """Status fields from the newest well-formed progress record in `log_tail`, or None."""
    for line in reversed(log_tail.splitlines()):
        record = progress_record(line)
        if record is None:
            continue
        fields = progress_fields(record)
        if fields is not None:
            return fields
    return None


def progress_fields(record: dict[str, Any]) -> dict[str, Any] | None:
    """`progress`, `metrics`, `warnings` and `artifacts` of one record, each validated by its
    status model; None when any is malformed."""
    try:
        progress = FineTuneProgress.model_validate(record.get("progress") or {})
        metrics = FineTuneMetrics.model_validate(record.get("metrics") or {})
        warnings = [TrainingWarning.model_validate(w) for w in record.get("warnings") or []]
        artifacts = FineTuneArtifacts.model_validate(record.get("artifacts") or {})
    except (ValidationError, TypeError, AttributeError):
        return None
    fields: dict[str, Any] = {
        "progress": progress.to_api(),
        "metrics": metrics.to_api(),
        "warnings": [w.to_api() for w in warnings[:32]],
    }
    if artifacts.to_api():
        fields["artifacts"] = artifacts.to_api()
    ts = record.get("ts")
    if isinstance(ts, str) and ts:
        fields["progress"]["updatedAt"] = ts
    return fields
