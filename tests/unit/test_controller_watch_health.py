"""The liveness verdict on the watches: a version the API server showed must arrive on the watch."""

from __future__ import annotations

from typing import Any

from graft.controller.handlers import CHILD_KINDS, CHILD_LABELS
from graft.controller.planner import LABEL_KIND, LABEL_NAME
from graft.controller.watch_health import MAX_PENDING, WatchHealth

RESOURCES = {**CHILD_KINDS, "FineTuneJob": "finetunejobs"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(clock: Clock) -> WatchHealth:
    return WatchHealth(RESOURCES, CHILD_KINDS, CHILD_LABELS, stale_after=60, clock=clock)


def obj(kind: str, version: Any, namespace: str = "team-a", labelled: bool = True) -> Any:
    labels = {LABEL_KIND: "FineTuneJob", LABEL_NAME: "tone"} if labelled else {}
    return {
        "kind": kind,
        "metadata": {
            "name": "tone",
            "namespace": namespace,
            "resourceVersion": str(version),
            "labels": labels,
        },
    }


def test_a_version_the_watch_delivers_in_time_is_healthy() -> None:
    clock = Clock()
    watches = health(clock)
    watches.seen_in_api(obj("FineTuneJob", 10))
    clock.now += 59
    assert watches.stale() == []
    watches.delivered(obj("FineTuneJob", 10))
    clock.now += 600
    assert watches.stale() == []


def test_a_version_never_delivered_makes_that_watch_stale_and_names_it() -> None:
    clock = Clock()
    watches = health(clock)
    watches.seen_in_api(obj("FineTuneJob", 10))
    watches.delivered(obj("Job", 11))  # another stream's progress proves nothing about this one
    watches.delivered(obj("FineTuneJob", 12, namespace="team-b"))  # nor another namespace's
    clock.now += 61
    (line,) = watches.stale()
    assert "finetunejobs watch in namespace team-a" in line and "resourceVersion 10" in line


def test_a_later_version_of_any_object_on_the_same_stream_settles_what_was_owed() -> None:
    clock = Clock()
    watches = health(clock)
    watches.seen_in_api(obj("Job", 10))
    watches.seen_in_api(obj("Job", 20))
    other = obj("Job", 15)
    other["metadata"]["name"] = "other"
    watches.delivered(other)  # the watch is past 10 (it delivers in order) but owes 20
    clock.now += 61
    (line,) = watches.stale()
    assert "resourceVersion 20" in line
    watches.delivered(obj("Job", 25))
    assert watches.stale() == []


def test_the_oldest_owed_version_decides_however_many_writes_follow() -> None:
    clock = Clock()
    watches = health(clock)
    for version in range(1, 3 * MAX_PENDING):  # a status patch every second, none delivered
        watches.seen_in_api(obj("FineTuneJob", version))
        clock.now += 1
    (line,) = watches.stale()
    assert "resourceVersion 1," in line and f"{3 * MAX_PENDING - 1:.0f} s ago" in line


def test_a_version_already_delivered_is_not_owed_again() -> None:
    clock = Clock()
    watches = health(clock)
    watches.delivered(obj("ConfigMap", 30))
    watches.seen_in_api(obj("ConfigMap", 30))  # a GET, or a patch that changed nothing
    watches.seen_in_api(obj("ConfigMap", 7))
    clock.now += 600
    assert watches.stale() == []


def test_objects_no_watch_of_ours_would_deliver_are_not_judged() -> None:
    clock = Clock()
    watches = health(clock)
    watches.seen_in_api(obj("ConfigMap", 10, labelled=False))  # outside the label selector
    watches.seen_in_api(obj("Event", 11))  # never watched
    watches.seen_in_api(obj("FineTuneJob", "not-a-number"))  # not comparable
    watches.seen_in_api({"kind": "Namespace", "metadata": {"name": "team-a"}})
    clock.now += 600
    assert watches.stale() == []
