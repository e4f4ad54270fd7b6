"""The operator killed (SIGKILL) on observed progress, five times across 50 FineTuneJobs: when the
5th and the 25th Job appear (mid-burst of creates), when the 10th resource turns Running (mid
status patches), and when the 10th and the 40th turn Succeeded. Restarted at once each time. In
the end: exactly one Job per resource, every resource Succeeded on its first attempt with the
right conditions."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.operator_kit import GROUP, PLURAL, VERSION, operator_namespace, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(600)]

COUNT = 50


class Progress:
    """What the cluster shows, from two watches: Jobs created, resources per phase."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.jobs: set[str] = set()
        self.phases: dict[str, str] = {}
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch_jobs, daemon=True),
            threading.Thread(target=self._watch_resources, daemon=True),
        ]

    def __enter__(self) -> Progress:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()

    def reached(self, phase: str) -> int:
        return Counter(self.phases.values())[phase]

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 120) -> None:
        with self.changed:
            if not self.changed.wait_for(condition, timeout):
                raise AssertionError(f"timed out waiting for {what}")

    def _watch_jobs(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            stream = watch.Watch().stream(
                self.cluster.batch.list_namespaced_job, self.cluster.ns, timeout_seconds=30
            )
            for event in stream:
                with self.changed:
                    self.jobs.add(event["object"].metadata.name)
                    self.changed.notify_all()

    def _watch_resources(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            stream = watch.Watch().stream(
                self.cluster.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.cluster.ns,
                PLURAL,
                timeout_seconds=30,
            )
            for event in stream:
                obj = event["object"]
                phase = (obj.get("status") or {}).get("phase")
                with self.changed:
                    if phase:
                        self.phases[obj["metadata"]["name"]] = phase
                    self.changed.notify_all()


def test_kill_the_operator_five_times_on_observed_progress(
    control_plane: Any, tmp_path: Any
) -> None:
    with operator_namespace(control_plane, tmp_path) as (op, cluster), Progress(cluster) as seen:
        names = [f"ftj-{i:02d}" for i in range(COUNT)]
        kills: list[tuple[str, int, int]] = []  # (moment, Jobs seen, resources in that phase)

        def kill_when(moment: str, condition: Callable[[], bool], phase: str = "") -> None:
            seen.wait(moment, condition)
            kills.append((moment, len(seen.jobs), seen.reached(phase) if phase else 0))
            op.kill()
            op.start()

        for name in names:
            cluster.create_ftj(name)
        kill_when("the 5th Job", lambda: len(seen.jobs) >= 5)
        kill_when("the 25th Job", lambda: len(seen.jobs) >= 25)
        seen.wait(f"{COUNT} Jobs", lambda: len(seen.jobs) >= COUNT)

        # Acting as the kubelet: every pod starts running ...
        pods = {name: cluster.wait_pod(name) for name in names}
        starter = threading.Thread(target=lambda: [cluster.pod_running(p) for p in pods.values()])
        starter.start()
        kill_when("the 10th Running", lambda: seen.reached("Running") >= 10, "Running")
        starter.join(60)
        seen.wait("every resource Running", lambda: seen.reached("Running") == COUNT, 120)
        # ... and ends well.
        finisher = threading.Thread(
            target=lambda: [cluster.pod_terminated(p, 0, reason="Completed") for p in pods.values()]
        )
        finisher.start()
        kill_when("the 10th Succeeded", lambda: seen.reached("Succeeded") >= 10, "Succeeded")
        kill_when("the 40th Succeeded", lambda: seen.reached("Succeeded") >= 40, "Succeeded")
        finisher.join(60)

        def all_succeeded() -> bool:
            return all(cluster.phase(n) == "Succeeded" for n in names)

        wait_for("every resource Succeeded", all_succeeded, 180, interval=0.5)
        # The kills landed mid-work: Jobs were still being created, phases still changing.
        assert [k[0] for k in kills] == [
            "the 5th Job",
            "the 25th Job",
            "the 10th Running",
            "the 10th Succeeded",
            "the 40th Succeeded",
        ]
        assert 5 <= kills[0][1] < COUNT and 25 <= kills[1][1] < COUNT, kills
        assert all(10 <= k[2] < COUNT for k in kills[2:4]) and 40 <= kills[4][2] < COUNT, kills

        jobs = cluster.jobs()
        assert sorted(j.metadata.labels["graft.dev/name"] for j in jobs) == names
        assert (
            len(jobs) == COUNT and len(seen.jobs) == COUNT
        )  # never a second Job, not even briefly
        for name in names:
            cluster.assert_succeeded_on_first_attempt(name)
