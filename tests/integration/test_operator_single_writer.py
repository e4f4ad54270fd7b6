"""The operator alone decides status, on the real control plane (the trainer pods are played by
the test, through the pod status API, as in the other operator tests).

A status forged by another identity over a running FineTuneJob (a Succeeded condition,
artifacts) changes neither what the operator decides for it nor what a downstream
OptimizeJob does: the operator computes it again from the Job and its pods, and the gate of
the OptimizeJob asks the FineTuneJob's children, not its status. When the pod really ends, the
artifacts and metrics come from its termination message, although the trainer wrote no status
at all. The same final status comes back when the operator was stopped while the pod ended.

The same for a searched FineTuneJob: a forged `status.search.best` (with a Succeeded condition
and artifacts) is computed again from the trial pods while the study runs and after it ended,
and the reference an OptimizeJob freezes in its spec ConfigMap is the best trial the pods
reported."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from graft.naming import artifact_prefix
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


def create_waiting_optimizejob(cluster: Cluster, name: str, source: str) -> None:
    """An OptimizeJob referencing `source`, once its gate says it waits for it."""
    create_optimizejob(cluster, name, source)
    wait_for(
        f"{name} waiting for {source}",
        lambda: any(
            c["reason"] == "WaitingForSource"
            for c in (optimizejob(cluster, name).get("status") or {}).get("conditions", [])
        ),
        30,
    )


def test_forged_status_changes_nothing_and_the_outcome_fills_status(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with operator_namespace(control_plane, tmp_path_factory.mktemp("writer")) as (op, cluster):
        cluster.create_ftj("src")
        pod = cluster.wait_pod("src")
        cluster.pod_running(pod)
        cluster.wait_phase("src", "Running", 30)
        create_waiting_optimizejob(cluster, "opt", "src")

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


SEARCH = {
    "strategy": "grid",
    "trials": 2,
    "parallelism": 1,
    "space": {"training.learningRate": {"type": "choice", "values": [0.01, 0.02]}},
}
RATES = {0: 0.01, 1: 0.02}


def forge_search(cluster: Cluster, name: str, prefix: str, trial: int) -> None:
    """Another identity's claim that the search finished with `trial` as its best."""
    now = "2026-01-01T00:00:00Z"
    status = {
        "phase": "Succeeded",
        "conditions": [
            {"type": t, "status": s, "reason": "Completed", "message": "forged"}
            | {"lastTransitionTime": now}
            for t, s in (("Succeeded", "True"), ("Running", "False"))
        ],
        "artifacts": {"adapter": f"{prefix}trials/{trial}/adapter/"},
        "search": {
            "completed": 2,
            "best": {
                "trial": trial,
                "params": {"training.learningRate": RATES[trial]},
                "value": 0.0,
            },
        },
    }
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, cluster.ns, PLURAL, name, {"status": status}
    )


def keep_forging(cluster: Cluster, name: str, prefix: str, trial: int, seconds: float) -> None:
    """Forge again and again: every write wakes the waiting dependents while the operator's
    cache holds the forged body, so a gate that read the status would launch on it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        forge_search(cluster, name, prefix, trial)
        time.sleep(0.3)


def trial_outcome(prefix: str, number: int, value: float) -> str:
    return json.dumps(
        {
            "kind": "FineTuneJob",
            "state": "Succeeded",
            "message": f"trial {number} complete",
            "trial": {
                "trial": number,
                "state": "Complete",
                "value": value,
                "step": 4,
                "params": {"training.learningRate": RATES[number]},
                "adapter": f"{prefix}trials/{number}/adapter/",
            },
        }
    )


def frozen_reference(cluster: Cluster, name: str) -> dict[str, Any] | None:
    """The reference an OptimizeJob launched with: `references` of its spec ConfigMap."""
    items = cluster.core.list_namespaced_config_map(
        cluster.ns, label_selector=f"graft.dev/name={name}"
    ).items
    if not items:
        return None
    document = json.loads(items[0].data["resource.json"])
    refs: dict[str, Any] = document["references"]
    return refs


def test_a_forged_search_best_decides_nothing(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`status.search.best`, a Succeeded condition and artifacts written by another identity
    over a searched FineTuneJob: the operator computes its study again from the trial pods, and
    an OptimizeJob referencing it waits while the study runs, then launches with the best
    trial the pods reported, also when the forged best names a real, worse trial."""
    with operator_namespace(control_plane, tmp_path_factory.mktemp("search")) as (_, cluster):
        created = cluster.create_ftj(
            "src",
            dataset={
                "uri": "s3://graft-artifacts/data/p.jsonl",
                "textTemplate": "{a} {b}",
                "evalSplit": "train[90%:]",
            },
            search=SEARCH,
        )
        uid = created["metadata"]["uid"]
        prefix = artifact_prefix("s3://graft-artifacts/it/", cluster.ns, "FineTuneJob", "src", uid)
        first = cluster.wait_pod("src")
        assert first.metadata.labels["graft.dev/trial"] == "0"
        cluster.pod_running(first)
        cluster.wait_phase("src", "Running", 30)
        create_waiting_optimizejob(cluster, "opt", "src")

        # While trial 0 runs: a forged finished search with trial 1 (never launched) as best.
        keep_forging(cluster, "src", prefix, 1, 5)

        def recomputed() -> dict[str, Any] | None:
            status = (cluster.ftj("src") or {}).get("status") or {}
            search = status.get("search") or {}
            ok = status.get("phase") == "Running" and "best" not in search
            return status if ok else None

        try:
            status = wait_for("src's study computed again from its trials", recomputed, 30)
        except AssertionError:
            raise AssertionError(json.dumps((cluster.ftj("src") or {}).get("status"))) from None
        assert "artifacts" not in status, status
        assert [t["number"] for t in status["search"]["trials"]] == [0], status["search"]
        # The OptimizeJob kept waiting: no spec ConfigMap froze the forged trial, no Job.
        assert frozen_reference(cluster, "opt") is None
        assert cluster.jobs("opt") == []
        assert (optimizejob(cluster, "opt").get("status") or {}).get("phase") == "Pending"
        assert [p.metadata.name for p in cluster.pods("src")] == [first.metadata.name]

        # Trial 0 reports the better objective, then trial 1 (launched only now) a worse one.
        cluster.pod_terminated(first, 0, reason="Completed", message=trial_outcome(prefix, 0, 1.0))
        second = cluster.wait_pod("src", exclude={first.metadata.name})
        assert second.metadata.labels["graft.dev/trial"] == "1"
        cluster.pod_running(second)
        cluster.pod_terminated(second, 0, reason="Completed", message=trial_outcome(prefix, 1, 2.0))
        status = cluster.wait_phase("src", "Succeeded", 60)["status"]
        assert status["search"]["best"]["trial"] == 0, status["search"]
        reference = wait_for("opt's frozen reference", lambda: frozen_reference(cluster, "opt"), 60)
        assert reference["src"]["uri"] == f"{prefix}trials/0/", reference
        wait_for("opt's Job", lambda: cluster.jobs("opt"), 30)

        # Over the finished study: a forged best naming trial 1, a real trial that did worse.
        # Neither src's status nor the reference a new OptimizeJob freezes takes it.
        forge_search(cluster, "src", prefix, 1)
        create_optimizejob(cluster, "late", "src")
        keep_forging(cluster, "src", prefix, 1, 5)

        def best_again() -> dict[str, Any] | None:
            status = (cluster.ftj("src") or {}).get("status") or {}
            best = (status.get("search") or {}).get("best") or {}
            return status if best.get("trial") == 0 else None

        try:
            status = wait_for("src's best computed again from its trials", best_again, 30)
        except AssertionError:
            raise AssertionError(json.dumps((cluster.ftj("src") or {}).get("status"))) from None
        assert status["artifacts"]["adapter"] == f"{prefix}trials/0/adapter/", status
        late = wait_for("late's frozen reference", lambda: frozen_reference(cluster, "late"), 60)
        assert late["src"]["uri"] == f"{prefix}trials/0/", late
        assert late["src"]["spec"]["training"]["learningRate"] == RATES[0], late
