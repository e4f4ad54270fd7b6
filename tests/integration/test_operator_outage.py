"""The API server (and etcd) stopped for a while mid-run and started again: the operator rides
it out without a restart of its own, a running job ends Succeeded on its first attempt with one
Job, and resources created after the outage launch (the watches came back)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.cluster import lc
from tests.integration.operator_kit import operator_namespace, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(400)]

OUTAGE_SECONDS = 10.0


def test_an_api_server_outage_is_ridden_out(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if control_plane.state_dir is None:
        pytest.skip("restarting the API server needs the local cluster (e2e/cluster)")
    with operator_namespace(control_plane, tmp_path_factory.mktemp("outage")) as (op, cluster):
        cluster.create_ftj("through")
        cluster.pod_running(cluster.wait_pod("through"))
        cluster.wait_phase("through", "Running", 30)

        lc.LocalCluster(control_plane.state_dir).restart_api_server(down_seconds=OUTAGE_SECONDS)

        assert op.proc is not None and op.proc.poll() is None, "the operator exited"
        (pod,) = cluster.pods("through")  # the same pod, running through the outage
        cluster.pod_terminated(pod, 0, reason="Completed")
        done = cluster.wait_phase("through", "Succeeded", 120)
        assert done["status"]["attempts"] == 1, done["status"]
        assert len(cluster.jobs("through")) == 1
        # the watches are back: a resource created after the outage launches
        cluster.create_ftj("after")
        wait_for("a Job for a resource made after the outage", lambda: cluster.jobs("after"), 60)
        assert op.proc.poll() is None, "the operator exited"
