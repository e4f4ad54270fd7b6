"""SIGTERM ends training at a step boundary with a checkpoint, so little is redone.

The kubelet sends SIGTERM when a pod is deleted (a suspend, an eviction, a spot reclaim,
`kubectl delete pod`) and SIGKILL after the pod's grace period. The training loop finishes the
step it is in, saves a checkpoint and raises `Preempted`; the next pod resumes from that step.
Only the process that got the signal (the single training process) acts on it; data-parallel
workers are stopped with it and resume from the last periodic checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any


class Preempted(Exception):
    """Training stopped on SIGTERM; a checkpoint of `step` was saved (unless it was the last)."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(
            f"stopped on SIGTERM at step {step} of {total} after saving a checkpoint; the next "
            "pod resumes from it"
        )
        self.step = step


class TerminationRequest:
    """A SIGTERM handler for the training loop that only takes note; `restore` puts back the one
    it replaced. Outside the main thread (a run inside a test or a thread pool) it installs
    nothing and never reports a request."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def install(self) -> TerminationRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._note)
            self._installed = True
        except ValueError:  # not the main thread
            pass
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
