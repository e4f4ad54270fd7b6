"""The keyed work queue: one pass per key at a time, coalescing, retries, delayed wake-ups."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from graft.controller import workqueue
from graft.controller.workqueue import WorkQueue


def test_coalesces_and_never_runs_a_key_twice_at_once() -> None:
    async def scenario() -> tuple[list[Hashable], int]:
        calls: list[Hashable] = []
        running: set[Hashable] = set()
        overlap = 0

        async def reconcile(key: Hashable) -> float | None:
            nonlocal overlap
            if key in running:
                overlap += 1
            running.add(key)
            calls.append(key)
            await asyncio.sleep(0.05)
            running.discard(key)
            return None

        queue = WorkQueue(reconcile, workers=4)
        queue.start()
        for _ in range(10):
            queue.add("a")
        queue.add("b")
        await asyncio.sleep(0.01)
        for _ in range(10):
            queue.add("a")  # while "a" runs: one more pass, not ten
        await asyncio.sleep(0.3)
        await queue.stop()
        return calls, overlap

    calls, overlap = asyncio.run(scenario())
    assert calls.count("a") == 2 and calls.count("b") == 1 and overlap == 0


def test_retries_failures_and_honours_requeue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workqueue, "RETRY_DELAYS", (0.01, 0.02))

    async def scenario() -> list[str]:
        seen: list[str] = []

        async def reconcile(key: Hashable) -> float | None:
            seen.append(str(key))
            if len(seen) == 1:
                raise RuntimeError("transient")
            return 0.05 if len(seen) == 2 else None

        queue = WorkQueue(reconcile, workers=1)
        queue.start()
        queue.add("k")
        await asyncio.sleep(0.3)
        await queue.stop()
        return seen

    assert asyncio.run(scenario()) == ["k", "k", "k"]


def test_urgent_keys_go_first_and_an_urgent_add_promotes_a_queued_key() -> None:
    async def scenario() -> tuple[list[Hashable], list[int]]:
        calls: list[Hashable] = []
        pending: list[int] = []

        async def reconcile(key: Hashable) -> float | None:
            calls.append(key)
            pending.append(queue.urgent_pending())
            await asyncio.sleep(0)
            return None

        queue = WorkQueue(reconcile, workers=1)
        for key in ("status-1", "status-2", "launch-1"):
            queue.add(key)
        queue.add("launch-1", urgent=True)  # already queued as normal: promoted
        queue.add("launch-2", urgent=True)
        queue.start()
        await asyncio.sleep(0.1)
        await queue.stop()
        return calls, pending

    calls, pending = asyncio.run(scenario())
    assert calls == ["launch-1", "launch-2", "status-1", "status-2"]
    # While a launch runs it still counts as pending; once they are done, none is.
    assert pending == [2, 1, 0, 0]
