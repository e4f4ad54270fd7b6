"""The operator against the real control plane: Job shape, validation, pod outcomes reported as
a kubelet would (the real Job controller reacting), suspend/resume, spec changes, deletion, TTL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.operator_kit import NO_NODE, Cluster, Operator, operator_namespace, wait_for
from tests.podsecurity import restricted_violations

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def env(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Operator, Cluster]]:
    # No kubelet here to run a pre-flight pod: a GPU job's Job is created at once.
    with operator_namespace(
        control_plane, tmp_path_factory.mktemp("operator"), GRAFT_PREFLIGHT_POD="false"
    ) as pair:
        yield pair


def one_job(cluster: Cluster, name: str) -> Any:
    return wait_for(f"the Job of {name}", lambda: cluster.jobs(name), 30)[0]


def test_one_job_with_the_expected_pod_spec(env: tuple[Operator, Cluster]) -> None:
    op, cluster = env
    cluster.create_ftj(
        "shape",
        resources={"gpu": 1, "cpu": "2", "memory": "4Gi"},
        scheduling={
            "nodeSelector": NO_NODE,
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "queueName": "team-queue",
        },
        backoffLimit=1,
        activeDeadlineSeconds=3600,
    )
    job = one_job(cluster, "shape")
    obj = cluster.ftj("shape")
    assert obj is not None
    assert job.metadata.name == "shape-train"
    assert job.metadata.owner_references[0].uid == obj["metadata"]["uid"]
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-queue"
    assert job.spec.active_deadline_seconds == 3600
    pod_spec = cluster.batch.api_client.sanitize_for_serialization(job.spec.template.spec)
    (container,) = pod_spec["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1", "cpu": "2", "memory": "4Gi"}
    assert pod_spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod_spec["nodeSelector"] == NO_NODE
    assert container["envFrom"] == [{"secretRef": {"name": "graft-s3", "optional": False}}]
    assert restricted_violations(pod_spec) == []
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["serviceAccountName"] == "graft-trainer"
    # The spec ConfigMap and the trainer identity (a ServiceAccount, bound to nothing) exist.
    cm = cluster.core.read_namespaced_config_map("shape-spec", cluster.ns)
    assert '"kind": "FineTuneJob"' in cm.data["resource.json"]
    cluster.core.read_namespaced_service_account("graft-trainer", cluster.ns)
    assert not cluster.rbac.list_namespaced_role_binding(cluster.ns).items
    # Status, and nothing of kopf's left on the resource.
    wait_for(
        "jobName in status", lambda: (cluster.ftj("shape") or {}).get("status", {}).get("jobName")
    )
    obj = cluster.ftj("shape")
    assert obj is not None
    assert cluster.condition("shape", "Validated")["status"] == "True"  # type: ignore[index]
    assert not obj["metadata"].get("finalizers")
    assert not any("kopf" in k for k in (obj["metadata"].get("annotations") or {}))
    # Several resyncs later there is still exactly one Job.
    time.sleep(6)
    assert len(cluster.jobs("shape")) == 1
    assert "graft_trainer_jobs_created_total" in op.metrics()


def test_invalid_spec_is_reported_and_nothing_is_launched(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("invalid", training={"earlyStopping": {"patience": 2}})
    cond = wait_for(
        "Validated=False",
        lambda: (c := cluster.condition("invalid", "Validated")) and c["status"] == "False" and c,
    )
    assert cond["reason"] == "InvalidSpec"
    assert "spec.training.earlyStopping" in cond["message"]
    assert cluster.phase("invalid") == "Failed"
    assert cluster.jobs("invalid") == []
    assert cluster.ftj("invalid") is not None  # the resource stays
    wait_for("a Warning event", lambda: ("Warning", "InvalidSpec") in cluster.events("invalid"))
    # Fixing the spec launches it.
    cluster.patch_ftj("invalid", {"dataset": {"evalSplit": "train[90%:]"}})
    one_job(cluster, "invalid")


def test_running_then_succeeded(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("ok")
    pod = cluster.wait_pod("ok")
    cluster.pod_running(pod)
    obj = cluster.wait_phase("ok", "Running", 30)
    assert obj["status"]["startTime"] and obj["status"]["attempts"] == 1
    # Progress is the operator's to write, from what the pod says: a patch by anyone else is
    # replaced by the outcome in the pod's termination message.
    cluster.custom.patch_namespaced_custom_object_status(
        "graft.dev",
        "v1alpha1",
        cluster.ns,
        "finetunejobs",
        "ok",
        {"status": {"progress": {"step": 5, "totalSteps": 10, "percent": 50}}},
    )
    outcome = {
        "kind": "FineTuneJob",
        "state": "Succeeded",
        "progress": {"step": 10, "totalSteps": 10, "percent": 100},
        "artifacts": {"adapter": "s3://graft-artifacts/it/adapter/"},
    }
    cluster.pod_terminated(pod, 0, reason="Completed", message=json.dumps(outcome))
    obj = cluster.wait_phase("ok", "Succeeded", 60)
    assert obj["status"]["completionTime"]
    assert obj["status"]["progress"]["step"] == 10
    assert obj["status"]["artifacts"] == {"adapter": "s3://graft-artifacts/it/adapter/"}
    events = cluster.events("ok")
    assert ("Normal", "JobCreated") in events
    wait_for("Succeeded event", lambda: ("Normal", "Completed") in cluster.events("ok"), 20)


def test_oom_kill_is_reported_with_advice(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("oom", backoffLimit=0, resources={"memory": "2Gi"})
    pod = cluster.wait_pod("oom")
    cluster.pod_running(pod)
    cluster.pod_terminated(pod, 137, reason="OOMKilled")
    obj = cluster.wait_phase("oom", "Failed", 60)
    failed = cluster.condition("oom", "Failed")
    assert failed is not None and failed["reason"] == "OOMKilled"
    assert "gradientCheckpointing" in failed["message"] and "qlora" in failed["message"]
    assert obj["status"]["completionTime"]
    wait_for("the Job stopped", lambda: cluster.jobs("oom") == [], 30)


def test_invalid_input_exit_code_fails_at_once(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("badinput", backoffLimit=3)
    pod = cluster.wait_pod("badinput")
    cluster.pod_terminated(pod, 2, message="dataset has no field 'tone'")
    cluster.wait_phase("badinput", "Failed", 60)
    failed = cluster.condition("badinput", "Failed")
    assert failed is not None and failed["reason"] == "InvalidInput"
    assert "dataset has no field 'tone'" in failed["message"]
    wait_for("the Job deleted", lambda: cluster.jobs("badinput") == [], 30)
    time.sleep(6)  # a resync later: not relaunched
    assert cluster.jobs("badinput") == [] and cluster.phase("badinput") == "Failed"


def test_eviction_is_retried_without_consuming_backoff(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("evict", backoffLimit=0)
    first = cluster.wait_pod("evict")
    cluster.pod_running(first)
    cluster.wait_phase("evict", "Running", 30)
    cluster.pod_evicted(first)
    running = wait_for(
        "Running=False/Restarting",
        lambda: (c := cluster.condition("evict", "Running")) and c["reason"] == "Restarting" and c,
        30,
    )
    assert "does not count toward backoffLimit" in running["message"]
    second = cluster.wait_pod("evict", exclude={first.metadata.name}, timeout=60)
    assert cluster.phase("evict") != "Failed"
    cluster.pod_running(second)
    obj = cluster.wait_phase("evict", "Running", 30)
    assert obj["status"]["attempts"] == 2


def test_suspend_and_resume(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("pause")
    pod = cluster.wait_pod("pause")
    cluster.pod_running(pod)
    cluster.wait_phase("pause", "Running", 30)
    cluster.patch_ftj("pause", {"suspend": True})
    cluster.wait_phase("pause", "Suspended", 30)
    wait_for("the Job deleted", lambda: cluster.jobs("pause") == [], 30)
    # The spec ConfigMap (and so the artifact prefix with its checkpoints) is kept.
    cluster.core.read_namespaced_config_map("pause-spec", cluster.ns)
    cluster.patch_ftj("pause", {"suspend": False})
    job = one_job(cluster, "pause")
    assert job.metadata.annotations["graft.dev/attempts-before"] == "1"
    new = cluster.wait_pod("pause", exclude={pod.metadata.name})
    cluster.pod_running(new)
    cluster.wait_phase("pause", "Running", 30)
    assert cluster.condition("pause", "Suspended")["reason"] == "Resumed"  # type: ignore[index]


def test_spec_change_after_start_is_refused(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("frozen")
    job = one_job(cluster, "frozen")
    cluster.patch_ftj("frozen", {"training": {"maxSteps": 7}})
    cond = wait_for(
        "SpecChangeRefused",
        lambda: (
            (c := cluster.condition("frozen", "Validated"))
            and c["reason"] == "SpecChangeRefused"
            and c
        ),
        30,
    )
    assert "spec.training.maxSteps" in cond["message"]
    (same,) = cluster.jobs("frozen")
    assert same.metadata.uid == job.metadata.uid


def test_deleting_the_resource_removes_its_job(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("gone")
    one_job(cluster, "gone")
    cluster.custom.delete_namespaced_custom_object(
        "graft.dev", "v1alpha1", cluster.ns, "finetunejobs", "gone"
    )
    wait_for("the resource gone", lambda: cluster.ftj("gone") is None, 30)
    wait_for("the Job collected", lambda: cluster.jobs("gone") == [], 60)


def test_ttl_deletes_the_finished_resource(env: tuple[Operator, Cluster]) -> None:
    _, cluster = env
    cluster.create_ftj("ttl", ttlSecondsAfterFinished=2)
    pod = cluster.wait_pod("ttl")
    cluster.pod_terminated(pod, 0, reason="Completed")
    cluster.wait_phase("ttl", "Succeeded", 60)
    wait_for("the resource deleted by TTL", lambda: cluster.ftj("ttl") is None, 30)


def _gang_pod(cluster: Cluster, name: str, node: str, exclude: set[str]) -> Any:
    def probe() -> Any:
        fresh = [
            p
            for p in cluster.pods(name)
            if p.metadata.labels.get("graft.dev/node") == node
            and p.metadata.name not in exclude
            and not p.metadata.deletion_timestamp
        ]
        return fresh[0] if fresh else None

    return wait_for(f"node {node}'s pod of {name}", probe, 60)


def _running_at(cluster: Cluster, pod: Any, ip: str) -> None:
    cluster.pod_running(pod)
    cluster.core.patch_namespaced_pod_status(
        pod.metadata.name, cluster.ns, {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}
    )


def test_a_two_node_gang_restarts_as_one_and_counts_only_its_failures(
    env: tuple[Operator, Cluster],
) -> None:
    """The v1.20 shape against the real Job controller (pods acted out as a kubelet would):
    node 0's Job, node 1's once node 0's pod has an IP; a lost pod restarts both without
    counting; a trainer failure past backoffLimit fails the job naming the pod."""
    _, cluster = env
    cluster.create_ftj("gang", resources={"nodes": 2}, backoffLimit=0)
    first0 = _gang_pod(cluster, "gang", "0", set())
    (job0,) = cluster.jobs("gang")
    assert job0.metadata.name == "gang-train" and job0.spec.backoff_limit == 0
    assert cluster.core.read_namespaced_service("gang-train", cluster.ns).spec.cluster_ip == "None"
    time.sleep(3)  # no IP yet: node 1 waits
    assert len(cluster.jobs("gang")) == 1
    _running_at(cluster, first0, "192.0.2.9")
    first1 = _gang_pod(cluster, "gang", "1", set())
    job1 = next(j for j in cluster.jobs("gang") if j.metadata.name == "gang-train-node-1")
    env_vars = {e.name: e.value for e in job1.spec.template.spec.containers[0].env}
    assert env_vars["GRAFT_RENDEZVOUS_ADDR"] == "192.0.2.9" and env_vars["GRAFT_NODE_RANK"] == "1"
    cluster.wait_reason("gang", "Running", "WaitingForPods")
    cluster.pod_running(first1)
    cluster.wait_reason("gang", "Running", "TrainerRunning")

    # Node 1's pod lost, node 0's process exits on the broken collective: both restart.
    cluster.pod_evicted(first1)
    cluster.pod_terminated(first0, 4, message="lost a peer")
    second0 = _gang_pod(cluster, "gang", "0", {first0.metadata.name})
    status = wait_for(
        "the second attempt counted",
        lambda: (s := (cluster.ftj("gang") or {}).get("status") or {}).get("attempts") == 2 and s,
        30,
    )
    assert not status.get("failedAttempts"), status
    assert cluster.phase("gang") != "Failed"
    _running_at(cluster, second0, "192.0.2.10")
    second1 = _gang_pod(cluster, "gang", "1", {first1.metadata.name})
    node1_env = {
        e.name: e.value
        for j in cluster.jobs("gang")
        if j.metadata.name == "gang-train-node-1"
        for e in j.spec.template.spec.containers[0].env
    }
    assert node1_env["GRAFT_RENDEZVOUS_ADDR"] == "192.0.2.10"

    # A trainer failure on node 1: one failed attempt, past backoffLimit 0.
    cluster.pod_running(second1)
    cluster.pod_terminated(second1, 1, message="CUDA error")
    obj = cluster.wait_phase("gang", "Failed", 30)
    failed = cluster.condition("gang", "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert second1.metadata.name in failed["message"], failed["message"]
    assert obj["status"]["failedAttempts"] == 1
    wait_for("the gang's Jobs deleted", lambda: cluster.jobs("gang") == [], 30)


def test_a_gang_whose_peer_hangs_counts_the_attempt_and_stops_at_backoff_limit(
    env: tuple[Operator, Cluster],
) -> None:
    """Node 0's process gives up on a collective (exit 4) while node 1's pod still runs, hung:
    no pod went away, so it is no loss's echo. The attempt counts, and past backoffLimit the
    job fails instead of restarting without end."""
    _, cluster = env
    cluster.create_ftj("hung", resources={"nodes": 2}, backoffLimit=0)
    pod0 = _gang_pod(cluster, "hung", "0", set())
    _running_at(cluster, pod0, "192.0.2.11")
    pod1 = _gang_pod(cluster, "hung", "1", set())
    cluster.pod_running(pod1)
    cluster.wait_reason("hung", "Running", "TrainerRunning")

    cluster.pod_terminated(pod0, 4, message="training process lost a peer")
    obj = cluster.wait_phase("hung", "Failed", 30)
    failed = cluster.condition("hung", "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded", failed
    assert pod0.metadata.name in failed["message"], failed["message"]
    assert "were still there" in failed["message"], failed["message"]
    assert obj["status"]["failedAttempts"] == 1 and obj["status"]["attempts"] == 1
    wait_for("the gang's Jobs deleted", lambda: cluster.jobs("hung") == [], 30)
