"""Per-tenant policy: a namespace's GPU budget (launches wait, they are not refused), node pools
that are defaulted rather than forced, the trainer ServiceAccount a platform names per
namespace, and each namespace's own artifact store and credentials Secret."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kubernetes_validate
import pytest

from graft.api.kinds import InvalidResource
from graft.controller import planner
from graft.controller.config import OperatorConfig
from graft.controller.reconciler import Caches, Reconciler
from graft.controller.status import GPU_WAIT_REASON, Observed, StudyObserved, compute_status
from graft.policy import GpuBudget, namespace_gpu_budget, parse_policy, policy_issues
from tests.unit.test_controller_status import NOW, cond, ftj
from tests.unit.test_controller_study import PREFIX, SPEC, trial

POLICY = parse_policy(
    {
        "maxGpusPerNamespace": 4,
        "namespaces": {
            "team-a": {
                "maxGpus": 2,
                "defaultNodeSelector": {"pool": "gpu-shared", "zone": "a"},
                "defaultTolerations": [{"key": "gpu", "operator": "Exists"}],
                "trainerServiceAccount": {
                    "name": "team-a-trainer",
                    "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/team-a"},
                },
                "output": {"uri": "s3://graft/team-a/", "credentialsSecret": "team-a-s3"},
            }
        },
    }
)
CONFIG = OperatorConfig(
    trainer_image="graft/trainer:test",
    output_uri="s3://graft/shared/",
    output_secret="shared-s3",
    policy=POLICY,
    preflight_pod=False,  # the GPU budget is what these tests count
)


def resource(namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": namespace, "uid": "0123abcd-0000-0000-0000-0"},
        "spec": {
            "model": {"uri": "s3://graft/models/tiny/"},
            "dataset": {"uri": "s3://graft/data/train.jsonl", "textTemplate": "{text}"},
            **spec,
        },
    }


def job_for(obj: dict[str, Any]) -> dict[str, Any]:
    namespace = obj["metadata"]["namespace"]
    resolved = planner.resolve_spec(obj["spec"], CONFIG, "FineTuneJob", namespace)
    job = planner.build_trainer_job(obj, resolved.spec, CONFIG, spec_hash_="h")
    kubernetes_validate.validate(job, "1.28.0", strict=True)
    return job


# --- GPU budget -------------------------------------------------------------------------------


def test_the_namespace_budget_overrides_the_platform_one() -> None:
    team_a = namespace_gpu_budget(POLICY, "team-a", in_use=1)
    other = namespace_gpu_budget(POLICY, "team-b", in_use=1)
    assert team_a == GpuBudget("team-a", 2, 1, "namespaces.team-a.maxGpus")
    assert other == GpuBudget("team-b", 4, 1, "maxGpusPerNamespace")
    assert namespace_gpu_budget(parse_policy({}), "team-b", in_use=9) is None


def test_a_launch_over_the_budget_waits_with_the_numbers_and_launches_once_it_fits() -> None:
    full = GpuBudget("team-b", 4, 3, "maxGpusPerNamespace")
    plan = compute_status(ftj(), Observed(current_hash="h", gpus=2, gpu_budget=full), NOW)
    assert not plan.create_job
    running = cond(plan.status, "Running")
    assert running["reason"] == GPU_WAIT_REASON
    assert (
        "asks for 2; namespace team-b holds 3 of its 4 (policy maxGpusPerNamespace)"
        in (running["message"])
    )
    assert plan.status["phase"] == "Pending"
    assert plan.requeue_after is not None
    # one GPU released: it fits now
    freed = GpuBudget("team-b", 4, 2, "maxGpusPerNamespace")
    again = compute_status(
        ftj(plan.status), Observed(current_hash="h", gpus=2, gpu_budget=freed), NOW
    )
    assert again.create_job
    # a CPU job never waits for GPUs
    cpu = compute_status(ftj(), Observed(current_hash="h", gpus=0, gpu_budget=full), NOW)
    assert cpu.create_job


def test_a_job_larger_than_its_namespace_budget_is_denied_not_left_waiting() -> None:
    issues = policy_issues({"resources": {"gpu": 3}}, "team-a", POLICY)
    assert [(i.dotted, i.rule) for i in issues] == [
        ("spec.resources.gpu", "namespaces.team-a.maxGpus")
    ]
    assert policy_issues({"resources": {"gpu": 3}}, "team-b", POLICY) == []


def test_a_search_launches_only_the_trials_that_fit() -> None:
    spec = copy.deepcopy(SPEC)
    spec["resources"] = {"gpu": 1}
    # parallelism 2, one GPU free: one trial now, the other waits
    observed = Observed(
        current_hash="h",
        study=StudyObserved(spec, PREFIX),
        gpus=1,
        gpu_budget=GpuBudget("team-b", 4, 3, "maxGpusPerNamespace"),
    )
    plan = compute_status(ftj(search=spec["search"]), observed, NOW)
    assert plan.create_trials == [0]
    assert "1 trials wait for GPUs" in cond(plan.status, "Running")["message"]
    # nothing fits and nothing runs: the search as a whole waits
    observed = Observed(
        current_hash="h",
        study=StudyObserved(spec, PREFIX),
        gpus=1,
        gpu_budget=GpuBudget("team-b", 4, 4, "maxGpusPerNamespace"),
    )
    plan = compute_status(ftj(search=spec["search"]), observed, NOW)
    assert plan.create_trials == []
    assert cond(plan.status, "Running")["reason"] == GPU_WAIT_REASON
    # one trial of its own runs (and holds the namespace's last GPU): still "running"
    observed = Observed(
        launched_hash="h",
        current_hash="h",
        study=StudyObserved(spec, PREFIX, (trial(0),)),
        gpus=1,
        gpu_budget=GpuBudget("team-b", 4, 4, "maxGpusPerNamespace"),
    )
    plan = compute_status(ftj(search=spec["search"]), observed, NOW)
    assert plan.create_trials == []
    assert cond(plan.status, "Running")["reason"] == "TrialsRunning"


def cached_job(name: str, gpus: int, *conditions: str, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "team-b",
        "annotations": {planner.ANNOTATION_GPUS: str(gpus)},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
    }


def test_gpus_in_use_count_unfinished_jobs_and_the_ones_just_created() -> None:
    jobs = {
        "team-b": [
            cached_job("a-train", 2),
            cached_job("b-train", 1, "Complete"),
            cached_job("c-train", 1, "Failed"),
            cached_job("d-train", 4, deleting=True),
        ],
        "team-c": [cached_job("e-train", 3)],
    }
    caches = Caches(namespace_jobs=lambda ns: jobs.get(ns, []))
    reconciler = Reconciler(kube=None, config=CONFIG, caches=caches)  # type: ignore[arg-type]
    assert reconciler._gpus_in_use("team-b") == 2
    # created by this process, not in the watch cache yet: counted...
    reconciler._claim_gpus(cached_job("f-train", 1))
    assert reconciler._gpus_in_use("team-b") == 3
    # ...once: when the cache shows it, its own entry counts (finished: nothing)
    jobs["team-b"].append(cached_job("f-train", 1, "Complete"))
    assert reconciler._gpus_in_use("team-b") == 2


def test_concurrent_launches_never_share_the_last_gpus() -> None:
    """Two resources asking for the namespace's last GPUs at the same moment: one launches, the
    other waits (counting and creating are one step per namespace)."""

    class RecordingKube:
        def __init__(self) -> None:
            self.created: list[dict[str, Any]] = []

        async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(0.01)  # the API server's round trip: the other launch runs
            self.created.append(manifest)
            return manifest

        async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
            return {"metadata": {"uid": "x", "resourceVersion": "1"}, **patch}

        async def event(self, *args: Any) -> None:
            return None

    kube = RecordingKube()
    reconciler = Reconciler(kube, CONFIG)  # type: ignore[arg-type]
    for n in (1, 2):
        obj = resource("team-a", resources={"gpu": 2})
        obj["metadata"].update(name=f"tune-{n}", uid=f"uid-{n}", generation=1)
        reconciler.observe(("FineTuneJob", "team-a", f"tune-{n}"), obj)

    async def both() -> None:
        await asyncio.gather(
            reconciler.reconcile(("FineTuneJob", "team-a", "tune-1")),
            reconciler.reconcile(("FineTuneJob", "team-a", "tune-2")),
        )

    asyncio.run(both())
    jobs = [m for m in kube.created if m["kind"] == "Job"]
    assert [j["metadata"]["annotations"][planner.ANNOTATION_GPUS] for j in jobs] == ["2"]
    waiting = reconciler.bodies[("FineTuneJob", "team-a", "tune-2")]
    if jobs[0]["metadata"]["name"].startswith("tune-2"):
        waiting = reconciler.bodies[("FineTuneJob", "team-a", "tune-1")]
    assert cond(waiting["status"], "Running")["reason"] == GPU_WAIT_REASON


# --- node pools, identity, artifact store ---------------------------------------------------


def test_a_default_pool_gives_way_to_the_spec() -> None:
    bare = job_for(resource("team-a"))["spec"]["template"]["spec"]
    assert bare["nodeSelector"] == {"pool": "gpu-shared", "zone": "a"}
    assert bare["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    own = resource(
        "team-a",
        scheduling={
            "nodeSelector": {"pool": "big"},
            "tolerations": [{"key": "spot", "operator": "Exists"}],
        },
    )
    pod = job_for(own)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "big", "zone": "a"}  # key by key
    assert pod["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    other = job_for(resource("team-b"))["spec"]["template"]["spec"]
    assert "nodeSelector" not in other and "tolerations" not in other


def test_each_namespace_runs_trainers_as_its_own_service_account() -> None:
    pod = job_for(resource("team-a"))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "team-a-trainer"
    identity = {o["kind"]: o for o in planner.trainer_identity("team-a", CONFIG)}
    account = identity["ServiceAccount"]["metadata"]
    assert account["name"] == "team-a-trainer"
    assert account["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/team-a"}
    assert set(identity) == {"ServiceAccount"}  # bound to no role: trainers need no API
    # another namespace: the operator's default, no annotations
    assert job_for(resource("team-b"))["spec"]["template"]["spec"]["serviceAccountName"] == (
        "graft-trainer"
    )
    other = planner.trainer_identity("team-b", CONFIG)[0]["metadata"]
    assert other["name"] == "graft-trainer" and "annotations" not in other


def test_each_namespace_defaults_to_its_own_store_and_credentials() -> None:
    team_a = planner.resolve_spec(resource("team-a")["spec"], CONFIG, "FineTuneJob", "team-a")
    assert team_a.spec["output"] == {"uri": "s3://graft/team-a/", "credentialsSecret": "team-a-s3"}
    team_b = planner.resolve_spec(resource("team-b")["spec"], CONFIG, "FineTuneJob", "team-b")
    assert team_b.spec["output"] == {"uri": "s3://graft/shared/", "credentialsSecret": "shared-s3"}
    # the credentials Secret reaches the pod by reference only
    env_from = job_for(resource("team-a"))["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"secretRef": {"name": "team-a-s3", "optional": False}} in env_from


def test_a_wrong_service_account_name_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"namespaces\.team-a\.trainerServiceAccount\.name"):
        parse_policy({"namespaces": {"team-a": {"trainerServiceAccount": {"name": "Team_A"}}}})
    with pytest.raises(InvalidResource):
        # and a namespace without any store is still told what to set
        planner.resolve_spec(resource("team-b")["spec"], OperatorConfig(), "FineTuneJob", "team-b")


def test_a_namespace_identity_is_ensured_again_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A namespace deleted and made anew (or a ServiceAccount deleted by hand) gets its trainer
    identity again without an operator restart."""
    from graft.controller import reconciler as module

    made: list[str] = []

    class Kube:
        async def create(self, manifest: dict[str, Any]) -> None:
            made.append(manifest["kind"])

    reconciler = Reconciler(Kube(), CONFIG)  # type: ignore[arg-type]

    async def twice() -> None:
        await reconciler._ensure_identity("team-a")
        await reconciler._ensure_identity("team-a")

    asyncio.run(twice())
    assert made == ["ServiceAccount"]  # once per namespace...
    monkeypatch.setattr(module, "IDENTITY_TTL", 0.0)
    asyncio.run(twice())
    assert made.count("ServiceAccount") == 3  # ...until it is due again


def test_graft_validate_judges_a_file_without_output_by_the_namespace_default(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from graft.cli import main

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "namespaces": {
                    "team-a": {
                        "outputPrefixes": ["s3://graft/team-a/"],
                        "output": {"uri": "s3://graft/team-a/", "credentialsSecret": "a-s3"},
                    }
                }
            }
        )
    )
    document = resource("team-a")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    args = ["validate", "--policy", str(policy), "--namespace", "team-a", str(path)]
    assert main(args) == 0, capsys.readouterr().out
    document["spec"]["output"] = {"uri": "s3://graft/team-b/steal/"}
    path.write_text(yaml.safe_dump(document))
    assert main(args) == 1
    assert "spec.output.uri" in capsys.readouterr().out
