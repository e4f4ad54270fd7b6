"""A GPU FineTuneJob is checked in a CPU pod before its GPU pod exists: the pre-flight Job the
planner builds, and the status steps (checking, passed, refused, retried, spec changed)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from graft.chart_values import TrainerPodValues
from graft.controller import planner
from graft.controller.config import ConfigError, OperatorConfig
from graft.controller.status import (
    Observed,
    PreflightObserved,
    compute_status,
    find_condition,
    is_terminal,
)
from tests.unit.test_controller_planner import CONFIG, resource

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
GPU_SPEC = {
    "resources": {"gpu": 2, "cpu": "8", "memory": "64Gi"},
    "scheduling": {
        "nodeSelector": {"nvidia.com/gpu.product": "H100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "training",
        "queueName": "gpu-queue",
    },
}


def gpu_resource(**spec: Any) -> dict[str, Any]:
    return resource(**{**GPU_SPEC, **spec})


def preflight_for(obj: dict[str, Any], config: OperatorConfig = CONFIG) -> dict[str, Any]:
    resolved = planner.resolve_spec(obj["spec"], config)
    return planner.build_preflight_job(obj, resolved.spec, config, spec_hash_=resolved.spec_hash)


def test_the_preflight_pod_is_the_trainer_pod_without_gpus_or_gpu_placement() -> None:
    config = OperatorConfig(
        **{**CONFIG.__dict__, "trainer_pod": TrainerPodValues(runtime_class_name="nvidia")}
    )
    obj = gpu_resource()
    check = preflight_for(obj, config)
    resolved = planner.resolve_spec(obj["spec"], config)
    train = planner.build_trainer_job(obj, resolved.spec, config, spec_hash_=resolved.spec_hash)
    meta = check["metadata"]
    assert (
        meta["name"] == "tone-classifier-preflight" == planner.preflight_job_name("tone-classifier")
    )
    assert meta["labels"][planner.LABEL_COMPONENT] == "preflight"
    assert planner.KUEUE_QUEUE not in meta["labels"]  # the queue's quota is for the GPU pod
    assert meta["annotations"][planner.ANNOTATION_GPUS] == "0"
    assert meta["annotations"][planner.ANNOTATION_SPEC_HASH] == resolved.spec_hash
    assert meta["ownerReferences"] == train["metadata"]["ownerReferences"]
    pod = check["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["graft-trainer", "preflight-resource"]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "4Gi"},
        "limits": {"cpu": "1", "memory": "4Gi"},
    }
    for absent in ("nodeSelector", "affinity", "runtimeClassName"):
        assert absent not in pod, absent
    assert pod["priorityClassName"] == "training"
    assert pod["tolerations"] == GPU_SPEC["scheduling"]["tolerations"]
    # Same inputs as the GPU pod: the spec ConfigMap, credentials, environment.
    train_pod = train["spec"]["template"]["spec"]
    assert pod["volumes"][0] == train_pod["volumes"][0]
    assert container["envFrom"] == train_pod["containers"][0]["envFrom"]
    assert {e["name"] for e in container["env"]} == {
        e["name"] for e in train_pod["containers"][0]["env"]
    }
    assert check["spec"]["backoffLimit"] == 1
    assert "nvidia.com/gpu" in str(train_pod["containers"][0]["resources"])


def test_which_jobs_get_a_preflight_pod() -> None:
    assert planner.needs_preflight_pod(gpu_resource()["spec"], CONFIG)
    assert not planner.needs_preflight_pod(resource()["spec"], CONFIG)  # CPU: checks in-pod
    assert not planner.needs_preflight_pod(gpu_resource()["spec"], CONFIG, "OptimizeJob")
    off = OperatorConfig.from_env({"GRAFT_PREFLIGHT_POD": "false"})
    assert not planner.needs_preflight_pod(gpu_resource()["spec"], off)
    sized = OperatorConfig.from_env(
        {"GRAFT_PREFLIGHT_CPU": "500m", "GRAFT_PREFLIGHT_MEMORY": "8Gi"}
    )
    assert (sized.preflight_pod, sized.preflight_cpu, sized.preflight_memory) == (
        True,
        "500m",
        "8Gi",
    )
    with pytest.raises(ConfigError, match="GRAFT_PREFLIGHT_MEMORY"):
        OperatorConfig.from_env({"GRAFT_PREFLIGHT_MEMORY": "lots"})


# ------------------------------------------------------------------ status steps


def ftj(status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "a", "namespace": "n", "uid": "u1", "generation": 1},
        "spec": {"backoffLimit": 1, "resources": {"gpu": 1}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def check_job(*conditions: str, spec_hash: str = "h") -> dict[str, Any]:
    return {
        "metadata": {
            "name": "a-preflight",
            "uid": "p1",
            "labels": {planner.LABEL_COMPONENT: "preflight"},
            "annotations": {planner.ANNOTATION_SPEC_HASH: spec_hash},
        },
        "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
    }


def check_pod(name: str, phase: str, code: int | None = None, message: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if code is not None:
        terminated = {"exitCode": code, "message": message, "reason": "Completed"}
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": {"name": name, "creationTimestamp": name}, "status": status}


def before_launch(pre: PreflightObserved, **kw: Any) -> Observed:
    return Observed(current_hash="h", gpus=1, preflight=pre, **kw)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found = find_condition(status["conditions"], type_)
    assert found is not None, type_
    return found


def test_no_gpu_pod_until_the_preflight_pod_has_passed() -> None:
    plan = compute_status(ftj(), before_launch(PreflightObserved()), NOW)
    assert plan.create_preflight and not plan.create_job
    assert condition(plan.status, "Running")["reason"] == "PreflightChecking"
    assert plan.status["phase"] == "Pending"

    running = PreflightObserved(check_job(), (check_pod("a-preflight-x", "Running"),))
    plan = compute_status(ftj(plan.status), before_launch(running), NOW)
    assert not plan.create_preflight and not plan.create_job
    assert "in a CPU pod before the GPU pod" in condition(plan.status, "Running")["message"]

    findings = "pre-flight passed in a CPU pod: 80 training and 20 evaluation records"
    passed = PreflightObserved(
        check_job("Complete"), (check_pod("a-preflight-x", "Succeeded", 0, findings),)
    )
    plan = compute_status(ftj(plan.status), before_launch(passed), NOW)
    assert plan.create_job and not plan.create_preflight
    validated = condition(plan.status, "Validated")
    assert (validated["status"], validated["reason"], validated["message"]) == (
        "True",
        "PreflightPassed",
        findings,
    )
    # Once the GPU Job runs, the findings stay the word on the launched spec.
    launched = Observed(
        current_hash="h",
        launched_hash="h",
        gpus=1,
        job={"metadata": {"name": "a-train", "uid": "j1", "annotations": {}}, "status": {}},
    )
    plan = compute_status(ftj(plan.status), launched, NOW)
    assert condition(plan.status, "Validated")["message"] == findings


def test_a_refused_input_fails_the_resource_before_any_gpu_is_requested() -> None:
    refused = PreflightObserved(
        check_job(),
        (
            check_pod(
                "a-preflight-x",
                "Failed",
                2,
                "trainSplit row 3: textTemplate field {tone} is missing",
            ),
        ),
    )
    plan = compute_status(ftj(), before_launch(refused), NOW)
    assert not plan.create_job and not plan.create_preflight
    assert plan.delete_preflight  # the Job would start a second pod for the same finding
    failed = condition(plan.status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "InvalidInput")
    assert "before any GPU was requested" in failed["message"]
    assert "row 3" in failed["message"]
    validated = condition(plan.status, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "PreflightFailed")
    assert plan.status["phase"] == "Failed" and is_terminal(plan.status)
    # Later passes keep the verdict and create nothing (the pre-flight Job may be gone).
    again = compute_status(ftj(plan.status), before_launch(PreflightObserved()), NOW)
    assert not again.create_preflight and not again.create_job
    assert condition(again.status, "Validated")["reason"] == "PreflightFailed"


def test_a_transient_preflight_failure_is_retried_then_reported() -> None:
    flaky = PreflightObserved(
        check_job(), (check_pod("a-preflight-1", "Failed", 1, "StoreError: connection refused"),)
    )
    plan = compute_status(ftj(), before_launch(flaky), NOW)
    assert not plan.create_job and condition(plan.status, "Failed")["status"] == "False"
    assert "retrying" in condition(plan.status, "Running")["message"]
    gave_up = PreflightObserved(
        check_job("Failed"),
        (
            check_pod("a-preflight-1", "Failed", 1, "StoreError: connection refused"),
            check_pod("a-preflight-2", "Failed", 1, "StoreError: connection refused"),
        ),
    )
    plan = compute_status(ftj(plan.status), before_launch(gave_up), NOW)
    failed = condition(plan.status, "Failed")
    assert failed["status"] == "True" and "connection refused" in failed["message"]
    assert not plan.delete_preflight  # finished: kept for kubectl logs


def test_a_spec_edited_during_preflight_is_checked_again() -> None:
    stale = PreflightObserved(check_job("Complete", spec_hash="old"), ())
    plan = compute_status(ftj(), before_launch(stale), NOW)
    assert plan.delete_preflight and not plan.create_job and not plan.create_preflight
    assert "the spec changed" in condition(plan.status, "Running")["message"]


# ------------------------------------------------------------------ the reconciler's actions


def test_the_reconciler_creates_the_preflight_job_then_the_gpu_job_with_its_findings() -> None:
    from graft.controller.reconciler import Caches, Reconciler
    from tests.unit.test_controller_launch import KEY, FakeKube, run
    from tests.unit.test_controller_launch import resource as launch_resource

    kube = FakeKube()
    kube.refuse_jobs = False
    pods: list[dict[str, Any]] = []

    def jobs(_: tuple[str, str]) -> list[dict[str, Any]]:
        made = kube.of_kind("Job")
        for job in made:  # the API server's uid and owner, which the cache filters on
            job["metadata"].setdefault("uid", "job-" + job["metadata"]["name"])
        return made

    caches = Caches(
        jobs=jobs,
        configmaps=lambda _: kube.of_kind("ConfigMap"),
        pods=lambda _: pods,
    )
    reconciler = Reconciler(kube, CONFIG, caches)  # type: ignore[arg-type]
    obj = launch_resource(resources={"gpu": 1})

    run(reconciler, obj)
    (check,) = kube.of_kind("Job")
    assert check["metadata"]["name"] == "tune-preflight"
    assert len(kube.of_kind("ConfigMap")) == 1  # the pod mounts the spec
    status = reconciler.bodies[KEY]["status"]
    assert condition(status, "Running")["reason"] == "PreflightChecking"
    assert ("Normal", "PreflightCreated") in kube.events

    run(reconciler, {**obj, "status": status})  # still checking: nothing new
    assert [j["metadata"]["name"] for j in kube.of_kind("Job")] == ["tune-preflight"]

    findings = "pre-flight passed in a CPU pod: 10 training and 0 evaluation records"
    passed = check_pod("tune-preflight-abc", "Succeeded", 0, findings)
    passed["metadata"]["ownerReferences"] = [{"uid": "job-tune-preflight"}]
    pods.append(passed)
    run(reconciler, {**obj, "status": status})
    names = sorted(j["metadata"]["name"] for j in kube.of_kind("Job"))
    assert names == ["tune-preflight", "tune-train"]
    train = next(j for j in kube.of_kind("Job") if j["metadata"]["name"] == "tune-train")
    assert "nvidia.com/gpu" in str(train["spec"]["template"]["spec"]["containers"][0]["resources"])
    # The findings were patched in the pass that launched (no later pass can read them).
    status = reconciler.bodies[KEY]["status"]
    assert condition(status, "Validated")["message"] == findings
    run(reconciler, {**obj, "status": {**status, "jobName": "tune-train"}})
    assert condition(reconciler.bodies[KEY]["status"], "Validated")["message"] == findings
    assert len(kube.of_kind("Job")) == 2
