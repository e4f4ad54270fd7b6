"""The platform policy on the real control plane: a resource that breaks a rule shows
PolicyDenied with the field and the rule, and no Job is created; fixing the spec launches it."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.integration.operator_kit import operator_namespace, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POLICY = {
    "allowedImages": ["registry.example/graft/"],
    "allowTrustRemoteCode": False,
    "maxGpusPerJob": 1,
    "allowedPriorityClasses": ["batch-low"],
}
ALLOWED_IMAGE = "registry.example/graft/trainer:1.0"


def test_denied_resources_launch_nothing_until_fixed(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with operator_namespace(
        control_plane, tmp_path_factory.mktemp("policy"), GRAFT_POLICY=json.dumps(POLICY)
    ) as (_, cluster):
        denied = {
            "image": ({"image": "docker.io/evil/trainer:1"}, "spec.image", "allowedImages"),
            "trust": (
                {
                    "image": ALLOWED_IMAGE,
                    "model": {"uri": "s3://graft-artifacts/models/tiny/", "trustRemoteCode": True},
                },
                "spec.model.trustRemoteCode",
                "allowTrustRemoteCode",
            ),
            "gpus": (
                {"image": ALLOWED_IMAGE, "resources": {"gpu": 4}},
                "spec.resources.gpu",
                "maxGpusPerJob",
            ),
        }
        for name, (spec, _, _) in denied.items():
            cluster.create_ftj(name, **spec)
        cluster.create_ftj("fine", image=ALLOWED_IMAGE)
        wait_for("the allowed resource's Job", lambda: cluster.jobs("fine"), 30)
        for name, (_, path, rule) in denied.items():
            failed = wait_for(
                f"{name} PolicyDenied",
                lambda n=name: (
                    (c := cluster.condition(n, "Failed")) and c["status"] == "True" and c
                ),
            )
            assert failed["reason"] == "PolicyDenied", failed
            assert (
                failed["message"].startswith(f"{path}: ")
                and f"(policy {rule})" in failed["message"]
            )
            assert cluster.phase(name) == "Failed"
        wait_for("a Warning event", lambda: ("Warning", "PolicyDenied") in cluster.events("image"))
        time.sleep(6)  # a resync later, still nothing launched for any denied resource
        assert all(cluster.jobs(name) == [] for name in denied)
        # Fixing the spec launches it.
        cluster.patch_ftj("image", {"image": ALLOWED_IMAGE})
        wait_for("the fixed resource's Job", lambda: cluster.jobs("image"), 30)


def test_a_namespace_over_its_gpu_budget_waits_and_launches_when_gpus_free(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    policy = {"maxGpusPerNamespace": 2}
    with operator_namespace(
        control_plane,
        tmp_path_factory.mktemp("budget"),
        GRAFT_POLICY=json.dumps(policy),
        # No kubelet here to run a pre-flight pod: the GPU Jobs are created at once.
        GRAFT_PREFLIGHT_POD="false",
    ) as (_, cluster):
        cluster.create_ftj("first", resources={"gpu": 2})
        wait_for("the first resource's Job", lambda: cluster.jobs("first"), 30)
        cluster.create_ftj("second", resources={"gpu": 1})
        cluster.create_ftj("cpu-only")  # needs no GPU: never waits
        wait_for("the CPU resource's Job", lambda: cluster.jobs("cpu-only"), 30)
        waiting = cluster.wait_reason("second", "Running", "WaitingForGpuBudget")
        assert "holds 2 of its 2 (policy maxGpusPerNamespace)" in waiting["message"], waiting
        assert cluster.phase("second") == "Pending"
        time.sleep(6)  # a resync later: still waiting, nothing launched
        assert cluster.jobs("second") == []
        # The first trainer finishes (acting as the kubelet): its GPUs are free again.
        cluster.pod_terminated(cluster.wait_pod("first"), 0, reason="Completed")
        cluster.wait_phase("first", "Succeeded", 60)
        wait_for("second launches once GPUs are free", lambda: cluster.jobs("second"), 60)
        job = cluster.jobs("second")[0]
        assert job.metadata.annotations["graft.dev/gpus"] == "1"
