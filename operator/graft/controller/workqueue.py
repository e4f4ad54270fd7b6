"""A keyed work queue: each key is reconciled by one worker at a time, and changes that arrive
while it runs coalesce into one more pass (the controller-runtime model, in asyncio).

Keys added as urgent (a resource not launched yet) are taken before the others, so that under
a burst of new resources every launch goes ahead of the status passes of those launched.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger("graft.controller.workqueue")

Reconcile = Callable[[Hashable], Awaitable[float | None]]

RETRY_DELAYS = (0.5, 1, 2, 5, 10, 30, 60)


class WorkQueue:
    def __init__(self, reconcile: Reconcile, workers: int = 16) -> None:
        self._reconcile = reconcile
        self._workers = workers
        self._urgent: deque[Hashable] = deque()
        self._normal: deque[Hashable] = deque()
        self._ready: asyncio.Queue[None] = asyncio.Queue()  # one token per queued key
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._active_urgent: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, key: Hashable, *, urgent: bool = False) -> None:
        """Reconcile `key` soon (once, however often it is added meanwhile)."""
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            (self._urgent if urgent else self._normal).append(key)
            self._ready.put_nowait(None)
        elif urgent and key not in self._urgent:
            self._normal.remove(key)
            self._urgent.append(key)

    def urgent_pending(self) -> int:
        """Urgent keys queued or being reconciled."""
        return len(self._urgent) + len(self._active_urgent)

    def add_after(self, key: Hashable, delay: float) -> None:
        """Reconcile `key` after `delay` seconds; an earlier pending wake-up wins."""
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        when = loop.time() + delay
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def state_sizes(self) -> dict[str, int]:
        """Keys held by each of the queue's maps (timers: reconciles due later)."""
        return {"failures": len(self._failures), "timers": len(self._timers)}

    def __len__(self) -> int:
        return len(self._queued) + len(self._active)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self._workers)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            await self._ready.get()
            urgent = bool(self._urgent)
            key = self._urgent.popleft() if urgent else self._normal.popleft()
            self._queued.discard(key)
            self._active.add(key)
            if urgent:
                self._active_urgent.add(key)
            try:
                requeue = await self._reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                count = self._failures.get(key, 0)
                self._failures[key] = count + 1
                delay = RETRY_DELAYS[min(count, len(RETRY_DELAYS) - 1)]
                logger.exception("reconcile of %s failed; retrying in %ss", key, delay)
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
                if requeue is not None:
                    self.add_after(key, requeue)
            finally:
                self._active.discard(key)
                self._active_urgent.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
