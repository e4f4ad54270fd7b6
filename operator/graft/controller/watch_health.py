"""Whether the operator's watches still deliver: the liveness behind /healthz.

A watch that went silent looks exactly like a quiet cluster from the inside, so it is judged by
what the API server has shown the operator in other ways. Every object of a watched kind that an
API response hands the operator (a GET, a create, a status patch) carries a resourceVersion; the
watch for that kind and namespace must deliver that version, or a later one, soon after. One that
is still missing after `stale_after` seconds means the stream is dead (kopf itself reconnects a
silent stream within about 70 s), and restarting the pod — which lists everything again — is the
cure.

Only what the API shows is judged: a watch nobody writes to is never called dead. Pods are watched
but never written by the operator, so a dead pod stream shows only through the Jobs and status it
leaves stale. resourceVersions are compared as integers, as etcd makes them; an object whose
version is not an integer is left out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Pending versions kept per stream: writes come faster than a live watch falls behind, and the
# oldest pending version is all the verdict needs.
MAX_PENDING = 64

StreamKey = tuple[str, str]  # (resource plural, namespace)


@dataclass
class _Stream:
    delivered: int = 0  # the highest resourceVersion the watch delivered
    pending: deque[tuple[int, float]] = field(default_factory=deque)  # (version, first seen)


class WatchHealth:
    def __init__(
        self,
        resources: Mapping[str, str],
        children: Iterable[str],
        child_labels: Iterable[str],
        stale_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`resources` maps each watched kind to its resource plural. Objects of the `children`
        kinds (Job, Pod, ConfigMap) count only when they carry every one of `child_labels`,
        because their watches select by those labels."""
        self.resources = dict(resources)
        self.children = frozenset(children)
        self.child_labels = tuple(child_labels)
        self.stale_after = stale_after
        self.clock = clock
        self._streams: dict[StreamKey, _Stream] = {}

    def _key(self, body: Mapping[str, Any]) -> tuple[StreamKey, int] | None:
        kind = str(body.get("kind") or "")
        resource = self.resources.get(kind)
        meta = body.get("metadata") or {}
        namespace = meta.get("namespace")
        if resource is None or not namespace:
            return None
        if kind in self.children:
            labels = meta.get("labels") or {}
            if not all(label in labels for label in self.child_labels):
                return None
        try:
            version = int(meta.get("resourceVersion") or "")
        except ValueError:
            return None
        return (resource, str(namespace)), version

    def seen_in_api(self, body: Mapping[str, Any]) -> None:
        """An API response showed this object: its watch owes us this version."""
        found = self._key(body)
        if found is None:
            return
        key, version = found
        stream = self._streams.setdefault(key, _Stream())
        if version <= stream.delivered:
            return
        if stream.pending and version <= stream.pending[-1][0]:
            return  # an older or equal version is already owed, and was seen earlier
        stream.pending.append((version, self.clock()))
        if len(stream.pending) > MAX_PENDING:
            del stream.pending[1]  # keep the oldest: it decides the verdict

    def delivered(self, body: Mapping[str, Any]) -> None:
        """The watch delivered this object: everything owed up to its version has arrived (a
        watch delivers in resourceVersion order)."""
        found = self._key(body)
        if found is None:
            return
        key, version = found
        stream = self._streams.setdefault(key, _Stream())
        stream.delivered = max(stream.delivered, version)
        while stream.pending and stream.pending[0][0] <= stream.delivered:
            stream.pending.popleft()

    def stale(self) -> list[str]:
        """One line per watch that owes a version for longer than `stale_after`; empty when all
        deliver."""
        now = self.clock()
        lines = []
        for (resource, namespace), stream in sorted(self._streams.items()):
            if not stream.pending:
                continue
            version, since = stream.pending[0]
            if now - since > self.stale_after:
                lines.append(
                    f"the {resource} watch in namespace {namespace} has not delivered "
                    f"resourceVersion {version}, which the API server showed {now - since:.0f} s "
                    f"ago (the watch delivered up to {stream.delivered})"
                )
        return lines
