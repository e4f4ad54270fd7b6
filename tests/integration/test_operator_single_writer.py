"""The operator alone decides status, on the real control plane (the trainer pods are played by
the test, through the pod status API, as in the other operator tests).

A status forged by another identity over a running FineTuneJob (a Succeeded condition,
artifacts) changes neither what the operator decides for it nor what a downstream
OptimizeJob does: the operator computes it again from the Job and its pods, and the gate of
the OptimizeJob asks the FineTuneJob's children, not its status. When the pod really ends, the
artifacts and metrics come from its termination message, although the trainer wrote no status
at all. The same final status comes back when the operator was stopped while the pod ended."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.operator_kit import (
    GROUP,
    NO_NODE,
    PLURAL,
    VERSION,
    Cluster,
    operator_namespace,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADAPTER = "s3://graft-artifacts/it/ns/finetunejobs/src/adapter/"


def create_optimizejob(cluster: Cluster, name: str, source: str) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "OptimizeJob",
        "metadata": {"name": name, "namespace": cluster.ns},
        "spec": {
            "source": {"fineTuneJobRef": {"name": source}},
            "scheduling": {"nodeSelector": NO_NODE},
        },
    }
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.ns, "optimizejobs", body)


def optimizejob(cluster: Cluster, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
        GROUP, VERSION, cluster.ns, "optimizejobs", name
    )
    return obj


def forge(cluster: Cluster, name: str) -> None:
    """What someone with status rights, not the operator, writes."""
    now = "2026-01-01T00:00:00Z"
    conditions = [
        {"type": "Succeeded", "status": "True", "reason": "Completed", "message": "forged"},
        {"type": "Running", "status": "False", "reason": "Completed", "message": "forged"},
    ]
    for cond in conditions:
        cond["lastTransitionTime"] = now
    status = {
        "phase": "Succeeded",
        "conditions": conditions,
        "artifacts": {"adapter": "s3://elsewhere/forged/"},
        "metrics": {"evalLoss": 0.0001},
    }
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, cluster.ns, PLURAL, name, {"status": status}
    )


def test_forged_status_changes_nothing_and_the_outcome_fills_status(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with operator_namespace(control_plane, tmp_path_factory.mktemp("writer")) as (op, cluster):
        cluster.create_ftj("src")
        pod = cluster.wait_pod("src")
        cluster.pod_running(pod)
        cluster.wait_phase("src", "Running", 30)
        create_optimizejob(cluster, "opt", "src")
        wait_for(
            "opt waiting for src",
            lambda: any(
                c["reason"] == "WaitingForSource"
                for c in (optimizejob(cluster, "opt").get("status") or {}).get("conditions", [])
            ),
            30,
        )

        forge(cluster, "src")

        # The operator computes src again from its running Job: Running, not Succeeded, and
        # the forged artifacts are not kept (a running job has none yet).
        def recomputed() -> dict[str, Any] | None:
            status = (cluster.ftj("src") or {}).get("status") or {}
            ok = status.get("phase") == "Running" and "elsewhere" not in json.dumps(status)
            return status if ok else None

        try:
            wait_for("src computed again from its Job", recomputed, 30)
        except AssertionError:
            raise AssertionError(json.dumps((cluster.ftj("src") or {}).get("status"))) from None
        # Meanwhile the downstream OptimizeJob did not launch on the forged Succeeded.
        assert cluster.jobs("opt") == []
        assert (optimizejob(cluster, "opt").get("status") or {}).get("phase") == "Pending"

        # The pod ends, its outcome as its termination message; the operator is down as it
        # happens. No one writes src's status but the operator, once it is back.
        op.stop()
        outcome = {
            "kind": "FineTuneJob",
            "state": "Succeeded",
            "message": "finished at step 10",
            "artifacts": {"adapter": ADAPTER},
            "metrics": {"evalLoss": 1.5, "trainLoss": 1.4},
            "progress": {"step": 10, "totalSteps": 10, "percent": 100},
        }
        cluster.pod_terminated(pod, 0, reason="Completed", message=json.dumps(outcome))
        wait_for(
            "src's Job complete",
            lambda: any(
                c.type == "Complete" for c in (cluster.jobs("src")[0].status.conditions or [])
            ),
            60,
        )
        op.start()
        status = cluster.wait_phase("src", "Succeeded", 60)["status"]
        assert status["artifacts"] == {"adapter": ADAPTER}
        assert status["metrics"] == {"evalLoss": 1.5, "trainLoss": 1.4}
        assert status["progress"]["percent"] == 100
        # ...and now, only now, the OptimizeJob launches.
        wait_for("opt's Job", lambda: cluster.jobs("opt"), 60)
