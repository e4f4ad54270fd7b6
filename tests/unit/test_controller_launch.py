"""Launching is one careful sequence: the spec ConfigMap first, then the Job. A Job the API server
refuses (a quota, an admission webhook, an invalid field) is shown on the resource as
LaunchRefused and tried again; fixing the spec launches the fixed spec; an old incarnation's
ConfigMap is never mounted by a new Job."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from graft.controller import planner
from graft.controller.config import OperatorConfig
from graft.controller.kube import ApiError, object_path
from graft.controller.reconciler import Caches, Reconciler
from tests.unit.test_controller_status import cond

CONFIG = OperatorConfig(trainer_image="graft/trainer:test", output_uri="s3://graft/out/")
KEY = ("FineTuneJob", "team-a", "tune")
QUOTA = json.dumps(
    {
        "kind": "Status",
        "message": 'jobs.batch "tune-train" is forbidden: exceeded quota: team-a, requested: '
        "count/jobs.batch=1, used: count/jobs.batch=4, limited: count/jobs.batch=4",
    }
)


class FakeKube:
    """An API server that keeps what is created and refuses Jobs while `refuse_jobs` is set."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.refuse_jobs = True
        self.events: list[tuple[str, str]] = []
        self.requests: list[str] = []

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        path = object_path(manifest)
        self.requests.append(f"create {manifest['kind']}")
        if manifest["kind"] == "Job" and self.refuse_jobs:
            raise ApiError(403, "Forbidden", QUOTA)
        if path in self.objects:
            return None
        self.objects[path] = json.loads(json.dumps(manifest))
        return self.objects[path]

    async def get(self, path: str) -> dict[str, Any] | None:
        return self.objects.get(path)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(f"patch {path.rsplit('/', 2)[-2]}")
        if path.endswith("/status"):
            return {"metadata": {"uid": "uid-1", "resourceVersion": "2"}, **patch}
        target = self.objects[path]
        for key, value in patch.items():
            target[key] = {**target.get(key, {}), **value} if isinstance(value, dict) else value
        return target

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects.values() if o["kind"] == kind]


def resource(generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "tune",
            "namespace": "team-a",
            "uid": "uid-1",
            "generation": generation,
        },
        "spec": {
            "model": {"uri": "s3://graft/models/tiny/"},
            "dataset": {"uri": "s3://graft/data/train.jsonl", "textTemplate": "{text}"},
            **spec,
        },
    }


def reconciler_over(kube: FakeKube) -> Reconciler:
    def configmaps(key: tuple[str, str]) -> list[dict[str, Any]]:
        return kube.of_kind("ConfigMap")

    def jobs(key: tuple[str, str]) -> list[dict[str, Any]]:
        return kube.of_kind("Job")

    return Reconciler(kube, CONFIG, Caches(jobs=jobs, configmaps=configmaps))  # type: ignore[arg-type]


def run(reconciler: Reconciler, obj: dict[str, Any]) -> float | None:
    """One reconcile of `obj`, with the Events it posts (in the background) sent."""

    async def once() -> float | None:
        requeue = await reconciler.reconcile(KEY)
        await reconciler.flush_events()
        return requeue

    reconciler.observe(KEY, obj)
    return asyncio.run(once())


def test_a_refused_job_is_shown_retried_and_the_fixed_spec_launches() -> None:
    kube = FakeKube()
    reconciler = reconciler_over(kube)
    requeue = run(reconciler, resource())
    # The ConfigMap went first; the Job was refused; the resource says why, in the API's words.
    launch = [r for r in kube.requests if r in ("create ConfigMap", "create Job")]
    assert launch == ["create ConfigMap", "create Job"]
    status = reconciler.bodies[KEY]["status"]
    running = cond(status, "Running")
    assert running["reason"] == "LaunchRefused"
    assert "exceeded quota: team-a" in running["message"], running
    assert status["phase"] == "Pending" and requeue == 30.0
    assert kube.events.count(("Warning", "LaunchRefused")) == 1

    # Tried again: the same refusal, no second Event.
    run(reconciler, {**resource(), "status": status})
    assert kube.events.count(("Warning", "LaunchRefused")) == 1

    # The user fixes the spec (a smaller job) and the quota allows it: the ConfigMap left by the
    # refused launch is brought up to date, then the Job is created. No SpecChangeRefused.
    kube.refuse_jobs = False
    fixed = {**resource(generation=2, resources={"cpu": "1"}), "status": status}
    run(reconciler, fixed)
    (job,) = kube.of_kind("Job")
    (configmap,) = kube.of_kind("ConfigMap")
    launched, spec_hash = planner.launched_spec(configmap)
    assert launched["resources"]["cpu"] == "1"
    assert job["metadata"]["annotations"][planner.ANNOTATION_SPEC_HASH] == spec_hash
    assert ("Normal", "JobCreated") in kube.events


def test_an_old_incarnations_configmap_is_never_mounted() -> None:
    """A resource deleted and applied again while its old ConfigMap is still being collected:
    no Job is created until that ConfigMap is gone."""
    kube = FakeKube()
    kube.refuse_jobs = False
    old = planner.build_spec_configmap(
        {**resource(), "metadata": {**resource()["metadata"], "uid": "uid-old"}},
        planner.resolve_spec(resource(resources={"cpu": "4"})["spec"], CONFIG),
    )
    kube.objects[object_path(old)] = old
    reconciler = reconciler_over(kube)
    assert run(reconciler, resource()) == 1.0  # looked at again shortly
    assert kube.of_kind("Job") == []
    del kube.objects[object_path(old)]  # collected
    run(reconciler, resource())
    (job,) = kube.of_kind("Job")
    (configmap,) = kube.of_kind("ConfigMap")
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_a_pod_the_job_controller_cannot_create_is_named() -> None:
    from graft.controller.status import Observed, compute_status
    from tests.unit.test_controller_status import NOW, ftj, job

    quota = 'pods "tune-train-x" is forbidden: exceeded quota: team-a, requested: pods=1'
    plan = compute_status(ftj(), Observed(current_hash="h", job=job(), pod_refused=quota), NOW)
    running = cond(plan.status, "Running")
    assert running["reason"] == "PodCreateRefused"
    assert running["message"] == f"the Job controller cannot create the trainer pod: {quota}"
    assert plan.requeue_after is not None and not plan.delete_job
    # once a pod exists, its own state is what counts
    from tests.unit.test_controller_status import pod

    pending = compute_status(
        ftj(plan.status),
        Observed(current_hash="h", job=job(), pods=(pod("p1", "Pending"),), pod_refused=quota),
        NOW,
    )
    assert cond(pending.status, "Running")["reason"] == "PodPending"


def test_a_job_a_queue_holds_says_so_instead_of_asking_for_nodes() -> None:
    """Kueue admits a workload by un-suspending its Job; until then the Job has no pod."""
    from graft.controller.status import Observed, compute_status
    from tests.unit.test_controller_status import NOW, ftj, job

    held = job("Suspended")
    held["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a-gpus"}
    plan = compute_status(ftj(), Observed(current_hash="h", job=held), NOW)
    running = cond(plan.status, "Running")
    assert running["reason"] == "Queued"
    assert "queue team-a-gpus to admit it" in running["message"]
    assert not plan.delete_job and plan.status["phase"] == "Pending"
    # admitted: the Job is no longer suspended and its pod runs
    from tests.unit.test_controller_status import pod

    admitted = compute_status(
        ftj(plan.status), Observed(current_hash="h", job=job(), pods=(pod("p1", "Running"),)), NOW
    )
    assert cond(admitted.status, "Running")["reason"] == "TrainerRunning"
