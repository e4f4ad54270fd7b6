"""Restart safety: the operator is killed (SIGKILL) three times while 20 FineTuneJobs are created
and run; in the end there is exactly one Job per resource and every status is right."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.integration.operator_kit import operator_namespace, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(400)]

COUNT = 20


def test_kill_the_operator_three_times_during_a_batch(control_plane: Any, tmp_path: Any) -> None:
    with operator_namespace(control_plane, tmp_path) as (op, cluster):
        names = [f"batch-{i:02d}" for i in range(COUNT)]
        created: list[str] = []

        def create_all() -> None:
            for name in names:
                cluster.create_ftj(name)
                created.append(name)
                time.sleep(0.05)

        creator = threading.Thread(target=create_all)
        creator.start()
        for pause in (0.3, 0.4, 0.5):
            time.sleep(pause)
            op.kill()  # at any moment: mid-create, mid-status-patch
            time.sleep(0.3)  # resources keep arriving while it is down
            op.start()
        creator.join(60)
        assert len(created) == COUNT

        def all_launched() -> bool:
            jobs = cluster.jobs()
            return len(jobs) >= COUNT and all(
                ((cluster.ftj(n) or {}).get("status") or {}).get("jobName") for n in names
            )

        wait_for("a Job and jobName for every resource", all_launched, 120, interval=0.5)
        jobs = cluster.jobs()
        assert sorted(j.metadata.labels["graft.dev/name"] for j in jobs) == names
        assert all(len(cluster.jobs(n)) == 1 for n in names)

        # Run them all to success, killing the operator once more half way.
        for i, name in enumerate(names):
            pod = cluster.wait_pod(name)
            cluster.pod_terminated(pod, 0, reason="Completed")
            if i == COUNT // 2:
                op.kill()
                op.start()

        def all_succeeded() -> bool:
            return all(cluster.phase(n) == "Succeeded" for n in names)

        wait_for("every resource Succeeded", all_succeeded, 120, interval=0.5)
        assert len(cluster.jobs()) == COUNT
        for name in names:
            cluster.assert_succeeded_on_first_attempt(name)
