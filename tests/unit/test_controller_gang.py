"""Multi-node FineTuneJobs (controller.gang): the shapes of an attempt's Jobs, its Service, and
how the status judges an attempt of several pods — pure, no cluster."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from graft.controller import gang, planner
from graft.controller.config import OperatorConfig
from graft.controller.reconciler import Caches
from graft.controller.status import Observed, compute_status, find_condition
from graft.exit_codes import EXIT_INVALID_INPUT, EXIT_PEER_LOST

REPO = Path(__file__).resolve().parents[2]
UID = "0123abcd-4567-89ef-0123-456789abcdef"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
CONFIG = OperatorConfig(trainer_image="graft/trainer:test", output_uri="s3://b/graft/")


def resource(nodes: int = 3, gpu: int = 2) -> dict[str, Any]:
    obj = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    obj["metadata"].update(namespace="team-a", uid=UID, generation=1)
    obj["spec"]["resources"] = {"nodes": nodes, "gpu": gpu}
    return obj


def build(obj: dict[str, Any], shape: planner.GangShape, config: OperatorConfig = CONFIG) -> Any:
    resolved = planner.resolve_spec(obj["spec"], config)
    return planner.build_trainer_job(
        obj, resolved.spec, config, spec_hash_=resolved.spec_hash, gang_shape=shape
    )


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_indexed_job_runs_one_pod_per_node_that_find_node_0_by_name() -> None:
    obj = resource()
    job = build(obj, planner.GangShape(indexed=True, failed_before=1))
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    # The Job controller never replaces one pod of a gang: the operator restarts all of them.
    assert spec["backoffLimit"] == 0
    assert spec["template"]["spec"]["subdomain"] == gang.service_name(name)
    env = env_of(job)
    assert env["GRAFT_NODES"] == "3"
    assert env["GRAFT_NODE_RANK"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert env["GRAFT_RENDEZVOUS_ADDR"] == f"{name}-0.{name}"
    assert env["GRAFT_RENDEZVOUS_PORT"] == "29500"
    annotations = job["metadata"]["annotations"]
    assert annotations["graft.dev/gpus"] == "6"  # the GPU budget counts every pod
    assert annotations[gang.ANNOTATION_FAILED_BEFORE] == "1"
    kubernetes_validate.validate(job, "1.28.0", strict=True)


def test_per_node_jobs_tell_the_others_node_0s_pod_ip() -> None:
    obj = resource(nodes=2, gpu=0)
    first = build(obj, planner.GangShape(indexed=False))
    second = build(obj, planner.GangShape(indexed=False, node=1, rendezvous="10.1.2.3"))
    assert first["metadata"]["name"] == planner.job_name("tone-classifier")
    assert second["metadata"]["name"] == "tone-classifier-train-node-1"
    for job, node in ((first, "0"), (second, "1")):
        assert job["spec"]["backoffLimit"] == 0 and job["spec"].get("completionMode") is None
        assert job["metadata"]["labels"][gang.LABEL_NODE] == node
        assert job["spec"]["template"]["metadata"]["labels"][gang.LABEL_NODE] == node
        assert env_of(job)["GRAFT_NODE_RANK"] == node
        kubernetes_validate.validate(job, "1.28.0", strict=True)
    assert env_of(first)["GRAFT_RENDEZVOUS_ADDR"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env_of(second)["GRAFT_RENDEZVOUS_ADDR"] == "10.1.2.3"
    assert second["metadata"]["annotations"][gang.ANNOTATION_RENDEZVOUS] == "10.1.2.3"
    # Node 0's Job keeps the trainer Job's name and is found as the resource's Job.
    caches = Caches(jobs=lambda _: [first, second])
    found = caches.job(("team-a", "tone-classifier"), UID)
    assert found is not None and found["metadata"]["name"] == first["metadata"]["name"]
    assert [
        j["metadata"]["name"] for j in caches.node_jobs(("team-a", "tone-classifier"), UID)
    ] == ["tone-classifier-train-node-1"]


def test_every_pod_of_the_gang_gets_the_specs_placement_and_one_queue() -> None:
    obj = resource(nodes=2, gpu=1)
    obj["spec"]["scheduling"] = {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "queueName": "team-a",
    }
    indexed = build(obj, planner.GangShape(indexed=True))
    # Kueue admits the Indexed Job as one workload of `parallelism` pods: the gang.
    assert indexed["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert indexed["spec"]["parallelism"] == 2
    node1 = build(obj, planner.GangShape(indexed=False, node=1, rendezvous="10.0.0.1"))
    for job in (indexed, node1):
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["gpu"] == "h100"
        assert {"key": "gpu", "operator": "Exists"} in pod["tolerations"]
        # One pod per node preferred, across the gang's pods (not only this node's).
        [term] = pod["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
        assert gang.LABEL_NODE not in selector and selector["graft.dev/name"] == "tone-classifier"
        kubernetes_validate.validate(job, "1.28.0", strict=True)


def test_one_node_is_todays_single_pod_job() -> None:
    obj = resource(nodes=1, gpu=2)
    job = build(obj, planner.GangShape(indexed=True))
    assert "completionMode" not in job["spec"] and "GRAFT_NODES" not in env_of(job)
    assert gang.LABEL_NODE not in job["metadata"]["labels"]


def test_host_network_pods_get_a_port_per_job_and_attempt() -> None:
    config = dataclasses.replace(CONFIG, trainer_host_network=True)
    obj = resource()
    resolved = planner.resolve_spec(obj["spec"], config)
    ports = {
        env_of(
            planner.build_trainer_job(
                obj,
                resolved.spec,
                config,
                spec_hash_=resolved.spec_hash,
                attempts_before=attempt,
                gang_shape=planner.GangShape(indexed=True),
            )
        )["GRAFT_RENDEZVOUS_PORT"]
        for attempt in range(3)
    }
    assert len(ports) == 3
    assert all(
        gang.HOST_PORT_BASE <= int(p) < gang.HOST_PORT_BASE + gang.HOST_PORT_SPAN for p in ports
    )


def test_headless_service_selects_the_jobs_trainer_pods() -> None:
    obj = resource()
    service = planner.build_rendezvous_service(obj)
    job = build(obj, planner.GangShape(indexed=True))
    assert service["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["metadata"]["ownerReferences"][0]["uid"] == UID
    kubernetes_validate.validate(service, "1.28.0", strict=True)


@pytest.mark.parametrize(
    ("version", "indexed"),
    [
        ({"major": "1", "minor": "20"}, False),
        ({"major": "1", "minor": "21"}, False),
        ({"major": "1", "minor": "22"}, True),
        ({"major": "1", "minor": "28+"}, True),
        ({}, False),
    ],
)
def test_indexed_jobs_are_detected_from_the_servers_version(
    version: dict[str, str], indexed: bool
) -> None:
    assert gang.supports_indexed_jobs(version) is indexed


# --- How the status judges an attempt of two pods (per-node shape) -------------------------


def gang_job(name: str, node: int, *conditions: str, failed_before: int = 0) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": {gang.LABEL_NODE: str(node)},
            "annotations": {
                "graft.dev/attempts-before": "2",
                "graft.dev/spec-hash": "h",
                gang.ANNOTATION_FAILED_BEFORE: str(failed_before),
            },
        },
        "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
    }


def gang_pod(name: str, node: int, phase: str, **status: Any) -> dict[str, Any]:
    exit_code = status.pop("exit_code", None)
    if exit_code is not None:
        status["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "message": "m"}}}
        ]
    meta: dict[str, Any] = {"name": name, "labels": {gang.LABEL_NODE: str(node)}}
    if status.pop("deleted", False):
        meta["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    return {"metadata": meta, "status": {"phase": phase, **status}}


def judge(
    *pods: dict[str, Any],
    node_jobs: tuple[dict[str, Any], ...] = (),
    job: dict[str, Any] | None = None,
    prev: dict[str, Any] | None = None,
    backoff_limit: int = 2,
    pods_seen: int | None = None,
) -> Any:
    obj = {
        "metadata": {"name": "a", "namespace": "n", "uid": "u1", "generation": 1},
        "spec": {"resources": {"nodes": 2}},
        "status": prev or {},
    }
    seen = Observed(
        launched_hash="h",
        current_hash="h",
        job=job or gang_job("a-train", 0),
        pods=pods,
        nodes=2,
        node_jobs=node_jobs,
        backoff_limit=backoff_limit,
        pods_seen=pods_seen,
    )
    return compute_status(obj, seen, NOW)


def running(name: str, node: int) -> dict[str, Any]:
    return gang_pod(name, node, "Running", podIP="192.0.2.2")


def condition(plan: Any, type_: str) -> dict[str, Any]:
    found = find_condition(plan.status["conditions"], type_)
    assert found is not None
    return found


def test_node_0s_pod_ip_launches_the_other_nodes_jobs() -> None:
    plan = judge(running("a-train-x", 0))
    assert plan.create_node_jobs == [1] and plan.rendezvous == "192.0.2.2"
    waiting = condition(plan, "Running")
    assert waiting["reason"] == "WaitingForPods" and "1 of 2 pods run" in waiting["message"]
    # Not before node 0's pod has an IP.
    assert judge(gang_pod("a-train-x", 0, "Pending")).create_node_jobs == []


def test_all_pods_running_train_together() -> None:
    plan = judge(
        running("a-train-x", 0),
        running("a-node-1-y", 1),
        node_jobs=(gang_job("a-train-node-1", 1),),
    )
    assert plan.create_node_jobs == [] and not plan.delete_job
    train = condition(plan, "Running")
    assert train["reason"] == "TrainerRunning" and "a-train-x, a-node-1-y" in train["message"]
    assert plan.status["attempts"] == 3  # attempts-before 2 + this one (not one per pod)


def test_a_pod_that_fails_restarts_every_pod_and_counts_once() -> None:
    plan = judge(
        gang_pod("a-train-x", 0, "Failed", exit_code=EXIT_PEER_LOST),
        gang_pod("a-node-1-y", 1, "Failed", exit_code=1),
        node_jobs=(gang_job("a-train-node-1", 1, "Failed"),),
    )
    restarting = condition(plan, "Running")
    assert restarting["reason"] == "Restarting"
    assert "pod a-node-1-y failed (exit code 1" in restarting["message"]
    assert "every pod of the 2 restarts from the last checkpoint" in restarting["message"]
    assert plan.delete_job and plan.status["failedAttempts"] == 1


def test_a_lost_pod_restarts_every_pod_without_counting() -> None:
    plan = judge(
        gang_pod("a-train-x", 0, "Failed", exit_code=EXIT_PEER_LOST),
        gang_pod("a-node-1-y", 1, "Running", deleted=True),
        prev={"failedAttempts": 1},
    )
    restarting = condition(plan, "Running")
    assert (
        restarting["reason"] == "Restarting" and "pod a-node-1-y was lost" in restarting["message"]
    )
    assert plan.delete_job and plan.status["failedAttempts"] == 1
    # A pod gone entirely: only its peer's exit 4 (and the failed Job) are left.
    gone = judge(
        gang_pod("a-train-x", 0, "Failed", exit_code=EXIT_PEER_LOST),
        node_jobs=(gang_job("a-train-node-1", 1, "Failed"),),
    )
    assert condition(gone, "Running")["reason"] == "Restarting"
    assert "lost a peer pod" in condition(gone, "Running")["message"]
    assert gone.status["failedAttempts"] == 0


def test_a_hung_peer_counts_when_every_pod_of_the_attempt_is_still_there() -> None:
    # Node 1's collective timed out waiting on node 0, which hangs but runs: no pod went away,
    # so the exit is no loss's echo and the attempt counts.
    hung = (
        running("a-train-x", 0),
        gang_pod("a-node-1-y", 1, "Failed", exit_code=EXIT_PEER_LOST),
    )
    plan = judge(*hung, pods_seen=2)
    restarting = condition(plan, "Running")
    assert restarting["reason"] == "Restarting", restarting
    assert "pod a-node-1-y lost a peer pod" in restarting["message"]
    assert "all 2 pods were still there" in restarting["message"]
    assert plan.delete_job and plan.status["failedAttempts"] == 1  # failed-before 0 + this one
    # Again and again: past backoffLimit the job fails instead of restarting without end.
    ended = judge(*hung, pods_seen=2, job=gang_job("a-train", 0, failed_before=2))
    assert ended.status["phase"] == "Failed"
    failed = condition(ended, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "3 failed attempts (backoffLimit 2)" in failed["message"]


def test_a_peer_lost_exit_with_a_pod_gone_or_replaced_does_not_count() -> None:
    lost_peer = gang_pod("a-train-x", 0, "Failed", exit_code=EXIT_PEER_LOST)
    # Node 1's pod was deleted and its Job made another: three pods seen, two there.
    replaced = judge(lost_peer, gang_pod("a-node-1-z", 1, "Pending"), pods_seen=3)
    assert condition(replaced, "Running")["reason"] == "Restarting"
    assert replaced.status["failedAttempts"] == 0
    # One of two pods there: the other went away.
    gone = judge(lost_peer, pods_seen=2)
    assert gone.status["failedAttempts"] == 0 and gone.delete_job
    # Pods seen unknown: nothing is counted on a guess.
    unknown = judge(lost_peer, running("a-node-1-y", 1))
    assert unknown.status["failedAttempts"] == 0 and unknown.delete_job


def test_failures_past_backoff_limit_fail_the_job_naming_the_pod() -> None:
    plan = judge(
        gang_pod("a-train-x", 0, "Running"),
        gang_pod("a-node-1-y", 1, "Failed", exit_code=1),
        job=gang_job("a-train", 0, failed_before=2),
    )
    failed = condition(plan, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    assert "3 failed attempts (backoffLimit 2); last: pod a-node-1-y failed" in failed["message"]
    assert plan.delete_job  # the pod still running would wait for its peer forever


def test_invalid_input_on_any_node_fails_at_once() -> None:
    plan = judge(
        gang_pod("a-train-x", 0, "Running"),
        gang_pod("a-node-1-y", 1, "Failed", exit_code=EXIT_INVALID_INPUT),
    )
    assert condition(plan, "Failed")["status"] == "True"


def test_a_pod_unschedulable_too_long_restarts_the_gang() -> None:
    def unschedulable(since: datetime) -> dict[str, Any]:
        cond = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available",
            "lastTransitionTime": since.isoformat().replace("+00:00", "Z"),
        }
        return gang_pod("a-node-1-y", 1, "Pending", conditions=[cond])

    late = NOW - timedelta(seconds=gang.UNSCHEDULABLE_GRACE_SECONDS + 5)
    plan = judge(running("a-train-x", 0), unschedulable(late))
    message = condition(plan, "Running")["message"]
    assert plan.delete_job and "pod a-node-1-y could not be scheduled" in message
    assert plan.status["failedAttempts"] == 0
    recent = judge(running("a-train-x", 0), unschedulable(NOW - timedelta(seconds=30)))
    assert not recent.delete_job
    assert condition(recent, "Running")["reason"] == "WaitingForPods"


def test_node_0s_outcome_is_the_jobs() -> None:
    from graft.contract import TrainerOutcome, encode_termination

    said = TrainerOutcome(
        kind="FineTuneJob", state="Succeeded", message="trained", metrics={"trainLoss": 1.5}
    )
    node0 = gang_pod("a-train-x", 0, "Succeeded")
    node0["status"]["containerStatuses"] = [
        {
            "name": "trainer",
            "state": {"terminated": {"exitCode": 0, "message": encode_termination(said)}},
        }
    ]
    plan = judge(
        node0,
        gang_pod("a-node-1-y", 1, "Succeeded"),
        job=gang_job("a-train", 0, "Complete"),
        node_jobs=(gang_job("a-train-node-1", 1, "Complete"),),
    )
    assert condition(plan, "Succeeded")["status"] == "True"
    assert plan.status["metrics"] == {"trainLoss": 1.5}
    assert not plan.delete_job
