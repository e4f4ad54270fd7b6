"""Refusals reach the user, on the real control plane: a Job that a ResourceQuota refuses shows
LaunchRefused in the API server's words and launches once the quota allows it; a pod that the Job
controller cannot create (a pod quota) shows PodCreateRefused, and the pod comes once the quota
is gone."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.operator_kit import create_quota as quota
from tests.integration.operator_kit import operator_namespace, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(400)]


def test_a_refused_job_and_a_refused_pod_are_named_and_recover(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with operator_namespace(control_plane, tmp_path_factory.mktemp("refusals")) as (_, cluster):
        quota(cluster, "no-jobs", {"count/jobs.batch": "0"})
        cluster.create_ftj("refused")
        cond = cluster.wait_reason("refused", "Running", "LaunchRefused")
        assert "exceeded quota: no-jobs" in cond["message"], cond
        assert cluster.phase("refused") == "Pending"
        # Events are posted in the background, after the status (at most 5 s later).
        wait_for(
            "the LaunchRefused Event",
            lambda: ("Warning", "LaunchRefused") in cluster.events("refused"),
            20,
        )
        assert cluster.jobs("refused") == []
        cluster.core.delete_namespaced_resource_quota("no-jobs", cluster.ns)
        wait_for("the Job once the quota allows it", lambda: cluster.jobs("refused"), 90)

        quota(cluster, "no-pods", {"pods": "0"})
        cluster.create_ftj("podless")
        wait_for("podless's Job", lambda: cluster.jobs("podless"), 30)
        cond = cluster.wait_reason("podless", "Running", "PodCreateRefused", 120)
        assert "exceeded quota: no-pods" in cond["message"], cond
        assert cluster.pods("podless") == []
        cluster.core.delete_namespaced_resource_quota("no-pods", cluster.ns)
        wait_for("the pod once the quota is gone", lambda: cluster.pods("podless"), 180)
        cluster.wait_reason("podless", "Running", "PodPending")


def test_a_namespace_deleted_and_made_anew_runs_a_new_resource(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The operator ensured the trainer identity there minutes ago (it is cached for
    IDENTITY_TTL); the namespace is deleted and created again, without it. A new resource there
    gets its pod: the Job controller's "serviceaccount not found" makes the operator ensure the
    identity again at once."""
    from kubernetes import client

    with operator_namespace(control_plane, tmp_path_factory.mktemp("renamespace")) as (_, cluster):
        cluster.create_ftj("first")
        cluster.wait_pod("first")
        account = cluster.pods("first")[0].spec.service_account_name
        cluster.core.delete_namespace(cluster.ns)

        def gone() -> bool:
            try:
                cluster.core.read_namespace(cluster.ns)
            except client.exceptions.ApiException as exc:
                return exc.status == 404
            return False

        wait_for("the namespace gone", gone, 120, interval=0.5)
        cluster.core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=cluster.ns))
        )
        cluster.create_ftj("second")
        wait_for("second's Job", lambda: cluster.jobs("second"), 60)
        cluster.wait_pod("second", timeout=150)
        accounts = cluster.core.list_namespaced_service_account(cluster.ns).items
        assert account in [a.metadata.name for a in accounts]
