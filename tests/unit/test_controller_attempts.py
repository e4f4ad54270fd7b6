"""status.attempts counts every pod a Job ran, also one deleted outright before it failed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from graft.controller.config import OperatorConfig
from graft.controller.reconciler import Caches, Reconciler
from graft.controller.status import Observed, compute_status

KEY = ("FineTuneJob", "ns", "a")


def job(uid: str = "j1", before: int = 0) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "a-train",
            "uid": uid,
            "annotations": {"graft.dev/attempts-before": str(before), "graft.dev/spec-hash": "h"},
        },
        "status": {},
    }


def pod(uid: str) -> dict[str, Any]:
    return {"metadata": {"name": f"a-train-{uid}", "uid": uid}, "status": {"phase": "Running"}}


def resource(attempts: int | None = None) -> dict[str, Any]:
    status = {} if attempts is None else {"attempts": attempts}
    return {"metadata": {"name": "a", "namespace": "ns", "uid": "u"}, "spec": {}, "status": status}


def test_a_deleted_pod_still_counts() -> None:
    reconciler = Reconciler(None, OperatorConfig())  # type: ignore[arg-type]
    assert reconciler._count_pods(KEY, resource(), job(), [pod("p1")]) == 1
    # p1 was deleted outright (gone from the cache) and the Job started p2.
    seen = reconciler._count_pods(KEY, resource(1), job(), [pod("p2")])
    assert seen == 2
    plan = compute_status(
        resource(1),
        Observed(launched_hash="h", current_hash="h", job=job(), pods=(pod("p2"),), pods_seen=seen),
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert plan.status["attempts"] == 2


def test_after_a_restart_the_status_keeps_what_it_counted() -> None:
    # A new process: the status says 3 pods ran for this Job; one is visible.
    reconciler = Reconciler(None, OperatorConfig())  # type: ignore[arg-type]
    assert reconciler._count_pods(KEY, resource(3), job(), [pod("p3")]) == 3
    assert reconciler._count_pods(KEY, resource(3), job(), [pod("p4")]) == 4
    # A new Job (resumed after suspend) starts counting after the attempts before it.
    assert reconciler._count_pods(KEY, resource(4), job("j2", before=4), [pod("p5")]) == 1
    assert reconciler._count_pods(KEY, resource(5), None, []) is None


def test_a_dependents_look_at_its_source_leaves_the_sources_count_alone() -> None:
    """The source gate of an OptimizeJob recomputes the referenced FineTuneJob's status from
    its Job and pods; that look must not remember (or forget) pods for the FineTuneJob."""
    source = {**resource(1), "kind": "FineTuneJob"}
    train = {**job(), "metadata": {**job()["metadata"], "ownerReferences": [{"uid": "u"}]}}
    visible = [pod("p2")]
    for p in visible:
        p["metadata"]["ownerReferences"] = [{"uid": "j1"}]
    jobs: list[dict[str, Any]] = [train]
    caches = Caches(jobs=lambda _: jobs, pods=lambda _: visible)
    reconciler = Reconciler(None, OperatorConfig(), caches)  # type: ignore[arg-type]
    reconciler.observe(KEY, source)

    # Not seen by its own passes yet: nothing is remembered for it.
    shown = asyncio.run(reconciler._as_its_children_show("ns", "a"))
    assert shown is not None and shown["status"]["attempts"] == 1
    assert KEY not in reconciler._pods_seen

    # Its own pass counted p1 (deleted since); the look sees p2 and counts it, but only the
    # FineTuneJob's own pass adds it.
    reconciler._pods_seen[KEY] = ("j1", 0, {"p1"})
    shown = asyncio.run(reconciler._as_its_children_show("ns", "a"))
    assert shown is not None and shown["status"]["attempts"] == 2
    assert reconciler._pods_seen[KEY] == ("j1", 0, {"p1"})

    # Its Job is not in the cache (yet): the look forgets nothing either.
    jobs.clear()
    asyncio.run(reconciler._as_its_children_show("ns", "a"))
    assert reconciler._pods_seen[KEY] == ("j1", 0, {"p1"})
