"""The reconciler reads resources from what the watch and its own patches showed it, never an
older version than it has seen; events wait while launches are pending."""

from __future__ import annotations

import asyncio
from typing import Any

from graft.controller.config import OperatorConfig
from graft.controller.kube import ApiError, resource_of
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


class GoneKube(RecordingKube):
    """The API server's view: the resource was deleted; its DELETED event never arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        raise ApiError(404, "Not Found", 'finetunejobs.graft.dev "a" not found')

    async def get(self, path: str) -> dict[str, Any] | None:
        self.gets += 1
        return None


def test_a_remembered_resource_that_is_gone_is_read_again_instead_of_failing() -> None:
    async def scenario() -> tuple[float | None, float | None, int, bool]:
        kube = GoneKube()
        reconciler = Reconciler(kube, OperatorConfig())  # type: ignore[arg-type]
        ghost = body("7")
        ghost["spec"] = {}  # invalid: the pass wants to patch Validated=False
        reconciler.observe(KEY, ghost)
        first = await reconciler(KEY)
        second = await reconciler(KEY)
        return first, second, kube.gets, KEY in reconciler.bodies

    first, second, gets, remembered = asyncio.run(scenario())
    assert first == 0.0 and not remembered  # forgotten, and reconciled again at once
    assert second is None and gets == 1  # read from the API: gone, nothing to do
