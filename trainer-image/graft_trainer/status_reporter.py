"""Progress into the resource's own status: the trainer side of the operator's status contract.

The trainer patches only `status.progress`, `status.metrics`, `status.warnings` and
`status.artifacts` of the resource it runs for (GRAFT_RESOURCE_KIND/NAME/NAMESPACE), through the
status subresource, as the `graft-trainer` ServiceAccount whose Role allows nothing but `get` and
`patch` on `<kinds>/status`. Conditions and phase belong to the operator and are never sent.

Patches are throttled (about one per two seconds; the last state is always flushed on `close`
and on stage changes) and failures are logged, never raised into the training loop. The last
state (the finished run's artifacts and metrics) must land before the pod exits, since the
operator reports success when it does: `close` and `patch_status` retry through an API outage
for up to GRAFT_STATUS_RETRY_SECONDS (default 180 s), as the store's operations do.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from graft.api.base import GROUP, VERSION
from graft.api.kinds import KINDS_BY_NAME
from graft.progress import ProgressEvent

log = logging.getLogger("graft_trainer.status")

MIN_INTERVAL = 2.0
DEFAULT_STATUS_RETRY_SECONDS = 180.0


def status_retry_seconds() -> float:
    """GRAFT_STATUS_RETRY_SECONDS: how long the final status is retried through an outage."""
    try:
        return max(0.0, float(os.environ.get("GRAFT_STATUS_RETRY_SECONDS", "").strip()))
    except ValueError:
        return DEFAULT_STATUS_RETRY_SECONDS


TRAINER_FIELDS = ("progress", "metrics", "warnings", "artifacts")


def status_body(event: ProgressEvent, now: datetime | None = None) -> dict[str, Any]:
    """The merge patch for one event: the trainer's four status fields, nothing else."""
    progress = event.progress.to_api()
    progress["updatedAt"] = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status: dict[str, Any] = {
        "progress": progress,
        "metrics": event.metrics.to_api(),
        "warnings": [w.to_api() for w in event.warnings],
    }
    if event.artifacts:
        status["artifacts"] = dict(event.artifacts)
    return {"status": status}


def _default_api() -> Any:
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:  # a workstation run with GRAFT_REPORTER=kubernetes
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.CustomObjectsApi()


class KubernetesStatusReporter:
    """`graft.progress.Reporter` that writes the resource's status subresource."""

    def __init__(
        self,
        api: Any = None,
        *,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        retry_seconds: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.kind = os.environ.get("GRAFT_RESOURCE_KIND", "FineTuneJob")
        self.name = os.environ.get("GRAFT_RESOURCE_NAME", "")
        self.namespace = os.environ.get("GRAFT_RESOURCE_NAMESPACE", "default")
        info = KINDS_BY_NAME.get(self.kind)
        self.plural = info.plural if info else "finetunejobs"
        self._api = api
        self._min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: ProgressEvent | None = None
        self._last_sent = float("-inf")
        self._last_stage = ""
        self._last_artifacts: dict[str, str] = {}
        self._failures = 0
        self._unsent: ProgressEvent | None = None  # the newest event whose patch failed
        self._retry_seconds = status_retry_seconds() if retry_seconds is None else retry_seconds
        self._sleep = sleep
        self.patches = 0

    def report(self, event: ProgressEvent) -> None:
        try:
            with self._lock:
                self._pending = event
                urgent = (
                    event.stage != self._last_stage
                    or event.artifacts != self._last_artifacts
                    or event.stage == "done"
                )
                if urgent or self._clock() - self._last_sent >= self._min_interval:
                    self._flush_locked()
        except Exception as exc:  # never into the training loop
            log.warning("status report dropped: %s", exc)

    def close(self) -> None:
        """Send the last state, retrying through an outage for the retry budget; never raises."""
        try:
            self._retry(self._flush_last)
        except Exception as exc:
            log.warning("final status report dropped: %s", exc)

    def _flush_last(self) -> None:
        with self._lock:
            if self._pending is None:
                self._pending, self._unsent = self._unsent, None
            if self._flush_locked() is False:
                raise RuntimeError(f"{self._failures} failed status patches")

    def patch_status(self, status: dict[str, Any]) -> None:
        """Record a finished stage's status fields (artifacts, metrics, ...) once, retrying
        through an outage for the retry budget; raises when it runs out.

        Unlike progress, this must land before the pod succeeds: the operator reports success
        as soon as the Job completes, and a reader then looks here for the artifacts.
        """
        if not self.name:
            return
        try:
            self._retry(lambda: self._send({"status": status}))
        except Exception as exc:
            raise RuntimeError(
                f"could not record the status of {self.kind} {self.namespace}/{self.name}: {exc}"
            ) from None

    def _retry(self, send: Callable[[], None]) -> None:
        deadline = self._clock() + self._retry_seconds
        delay = 1.0
        while True:
            try:
                send()
                return
            except Exception as exc:
                left = deadline - self._clock()
                if left <= 0:
                    raise
                log.warning("status patch failed; retrying for up to %.0f s more: %s", left, exc)
                self._sleep(min(delay, left))
                delay = min(delay * 2, 15.0)

    def _send(self, body: dict[str, Any]) -> None:
        """One merge patch of the resource's status subresource (secret values redacted)."""
        from graft_trainer.redaction import redact_strings

        body = redact_strings(body)  # type: ignore[assignment]
        if self._api is None:
            self._api = _default_api()
        self._api.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self.namespace,
            self.plural,
            self.name,
            body,
            _content_type="application/merge-patch+json",
        )
        self.patches += 1

    def _flush_locked(self) -> bool | None:
        """Send the pending event: True when sent, False when the patch failed (the event is
        kept for `close`), None when there was nothing to send."""
        event, self._pending = self._pending, None
        if event is None or not self.name:
            return None
        self._last_sent = self._clock()
        self._last_stage = event.stage
        self._last_artifacts = dict(event.artifacts)
        try:
            self._send(status_body(event))
            self._failures = 0
            self._unsent = None
            return True
        except Exception as exc:
            self._failures += 1
            self._unsent = event
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning(
                    "could not patch %s %s/%s status (%d failures): %s",
                    self.kind,
                    self.namespace,
                    self.name,
                    self._failures,
                    exc,
                )
            return False
