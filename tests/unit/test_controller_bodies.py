"""The reconciler reads resources from what the watch and its own patches showed it, never an
older version than it has seen; events wait while launches are pending."""

from __future__ import annotations

import asyncio
from typing import Any

from graft.controller.config import OperatorConfig
from graft.controller.kube import resource_of
from graft.controller.reconciler import Reconciler
from graft.controller.status import Event

KEY = ("FineTuneJob", "ns", "a")


def body(rv: str, uid: str = "u", phase: str = "Pending") -> dict[str, Any]:
    return {
        "metadata": {"name": "a", "namespace": "ns", "uid": uid, "resourceVersion": rv},
        "status": {"phase": phase},
    }


def test_an_older_watch_event_never_replaces_a_newer_patch_response() -> None:
    reconciler = Reconciler(None, OperatorConfig())  # type: ignore[arg-type]
    reconciler.observe(KEY, body("10", phase="Running"))  # our status patch's response
    reconciler.observe(KEY, body("9"))  # the watch event from before the patch, late
    assert reconciler.bodies[KEY]["status"]["phase"] == "Running"
    reconciler.observe(KEY, body("11", phase="Succeeded"))
    assert reconciler.bodies[KEY]["status"]["phase"] == "Succeeded"
    # A recreated resource (new uid) starts over, whatever its resourceVersion.
    reconciler.observe(KEY, body("3", uid="v"))
    assert reconciler.bodies[KEY]["metadata"]["uid"] == "v"
    reconciler.observe(KEY, None)
    assert KEY not in reconciler.bodies


class RecordingKube:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)


def test_events_wait_while_launches_are_pending_and_are_flushed_on_stop() -> None:
    async def scenario() -> tuple[list[str], list[str], list[str]]:
        kube = RecordingKube()
        reconciler = Reconciler(kube, OperatorConfig())  # type: ignore[arg-type]
        launches = [1]
        reconciler.busy = lambda: bool(launches)
        reconciler._post(body("1"), Event("Normal", "JobCreated", "created Job a-train"))
        await asyncio.sleep(0.2)
        while_busy = list(kube.events)
        launches.clear()
        await asyncio.sleep(0.2)
        after = list(kube.events)
        launches.append(1)
        reconciler._post(body("2"), Event("Normal", "Validated", "ok"))
        await reconciler.flush_events()
        return while_busy, after, kube.events

    while_busy, after, flushed = asyncio.run(scenario())
    assert while_busy == [] and after == ["JobCreated"]
    assert flushed == ["JobCreated", "Validated"]


def test_api_request_metrics_name_the_resource_and_subresource() -> None:
    assert resource_of("/apis/graft.dev/v1alpha1/namespaces/ns/finetunejobs/a/status") == (
        "finetunejobs/status"
    )
    assert resource_of("/apis/batch/v1/namespaces/ns/jobs") == "jobs"
    assert resource_of("/api/v1/namespaces/ns/events") == "events"
    assert resource_of("/api/v1/namespaces/ns/pods/p?watch=1") == "pods"
    assert resource_of("/apis/graft.dev/v1alpha1/finetunejobs") == "finetunejobs"
