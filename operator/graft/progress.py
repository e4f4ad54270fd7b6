"""What the trainer reports while it runs, and the interface that carries it.

The trainer calls a `Reporter`; where the report goes is the reporter's business: a rich
progress display for `graft run`, JSON lines in logs, or the FineTuneJob's own status in a
cluster. The event's fields use the API's status models so that status is written in one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from graft.api.finetune import FineTuneMetrics, FineTuneProgress, TrainingWarning

Stage = Literal["preflight", "loading", "baseline", "training", "evaluating", "exporting", "done"]


@dataclass
class ProgressEvent:
    """A snapshot of a run. Reporters may drop events; each one carries the whole state."""

    stage: Stage
    progress: FineTuneProgress = field(default_factory=FineTuneProgress)
    metrics: FineTuneMetrics = field(default_factory=FineTuneMetrics)
    warnings: list[TrainingWarning] = field(default_factory=list)
    message: str = ""
    # URIs of artifacts whose manifest is written: name (adapter, report, ...) -> URI.
    artifacts: dict[str, str] = field(default_factory=dict)


class Reporter(Protocol):
    """Receives progress. Must never raise into the training loop and must be cheap."""

    def report(self, event: ProgressEvent) -> None: ...

    def close(self) -> None: ...
