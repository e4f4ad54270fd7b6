"""Platform policy: each rule refuses what it should, naming the field and the rule; the
operator's planner and status, the chart and `graft validate --policy` all apply it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.api.kinds import InvalidResource
from graft.cli import main
from graft.controller import planner
from graft.controller.config import ConfigError, OperatorConfig
from graft.policy import PlatformPolicy, PolicyIssue, parse_policy, policy_issues

REPO = Path(__file__).resolve().parents[2]
POLICY = parse_policy(
    {
        "allowedImages": ["registry.example/graft/", "mirror.example/trainer@sha256:ab"],
        "allowTrustRemoteCode": False,
        "maxGpusPerJob": 2,
        "allowedPriorityClasses": ["batch-low"],
        "namespaces": {"team-a": {"outputPrefixes": ["s3://graft/team-a/"]}},
    }
)


def spec(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"uri": "s3://graft/models/tiny/"},
        "output": {"uri": "s3://graft/team-a/out/"},
        "image": "registry.example/graft/trainer:1.0",
        "resources": {"gpu": 1},
        "scheduling": {"priorityClassName": "batch-low"},
    }
    body.update(overrides)
    return body


def rules(found: list[PolicyIssue]) -> dict[str, str]:
    return {i.rule: i.dotted for i in found}


def test_a_spec_within_the_policy_passes() -> None:
    assert policy_issues(spec(), "team-a", POLICY) == []
    assert policy_issues(spec(image="mirror.example/trainer@sha256:abcdef"), "team-a", POLICY) == []
    # an empty policy allows everything
    anything = spec(
        image="x/y:z", resources={"gpu": 64}, model={"uri": "a", "trustRemoteCode": True}
    )
    assert policy_issues(anything, "team-b", PlatformPolicy()) == []


@pytest.mark.parametrize(
    ("override", "rule", "path"),
    [
        ({"image": "docker.io/evil/trainer:1"}, "allowedImages", "spec.image"),
        (
            {"model": {"uri": "s3://m/", "trustRemoteCode": True}},
            "allowTrustRemoteCode",
            "spec.model.trustRemoteCode",
        ),
        ({"resources": {"gpu": 3}}, "maxGpusPerJob", "spec.resources.gpu"),
        (
            {"scheduling": {"priorityClassName": "system-cluster-critical"}},
            "allowedPriorityClasses",
            "spec.scheduling.priorityClassName",
        ),
        (
            {"output": {"uri": "s3://graft/team-b/steal/"}},
            "namespaces.team-a.outputPrefixes",
            "spec.output.uri",
        ),
    ],
)
def test_each_rule_names_the_field_and_the_rule(
    override: dict[str, Any], rule: str, path: str
) -> None:
    found = policy_issues(spec(**override), "team-a", POLICY)
    assert rules(found) == {rule: path}
    assert str(found[0]).startswith(f"{path}: ") and f"(policy {rule})" in str(found[0])


def test_trust_remote_code_is_found_wherever_a_location_sets_it() -> None:
    bundle = {"baseModel": {"uri": "s3://m/", "trustRemoteCode": True}, "adapters": []}
    assert rules(policy_issues(bundle, None, POLICY)) == {
        "allowTrustRemoteCode": "spec.baseModel.trustRemoteCode"
    }


def test_output_prefixes_bind_only_their_namespace() -> None:
    assert policy_issues(spec(output={"uri": "s3://graft/team-b/"}), "team-b", POLICY) == []


def test_a_wrong_policy_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"allowedImage: unknown field; did you mean"):
        parse_policy({"allowedImage": []})
    with pytest.raises(ConfigError, match=r"GRAFT_POLICY: maxGpusPerJob"):
        OperatorConfig.from_env({"GRAFT_POLICY": '{"maxGpusPerJob": -1}'})
    with pytest.raises(ConfigError, match="GRAFT_POLICY is not JSON"):
        OperatorConfig.from_env({"GRAFT_POLICY": "{"})
    assert OperatorConfig.from_env({"GRAFT_POLICY": ""}).policy == PlatformPolicy()


def test_the_planner_refuses_with_policy_issues_after_defaults() -> None:
    obj = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    obj["spec"].pop("output", None)
    config = OperatorConfig(output_uri="s3://graft/shared/", policy=POLICY)
    resolved = planner.resolve_spec(obj["spec"], config, "FineTuneJob")
    with pytest.raises(InvalidResource) as caught:
        planner.admit(resolved, config, "team-a")
    # the operator's default output is checked like one the spec names
    assert [str(i) for i in caught.value.issues] == [
        "spec.output.uri: 's3://graft/shared/' is outside what namespace team-a may write: "
        "s3://graft/team-a/ (policy namespaces.team-a.outputPrefixes)"
    ]
    allowed = dataclasses.replace(config, output_uri="s3://graft/team-a/")
    assert planner.admit(planner.resolve_spec(obj["spec"], allowed), allowed, "team-a").spec


def test_status_says_policy_denied_and_nothing_launches() -> None:
    from graft.controller.status import Observed, compute_status
    from tests.unit.test_controller_status import NOW, cond, ftj

    issue = PolicyIssue(("spec", "image"), "'x' is not an allowed image", "allowedImages")
    plan = compute_status(ftj(), Observed(issues=(issue,)), NOW)
    assert not plan.create_job
    for type_ in ("Validated", "Failed", "Running"):
        assert cond(plan.status, type_)["reason"] == "PolicyDenied"
    assert "spec.image" in cond(plan.status, "Failed")["message"]
    assert plan.status["phase"] == "Failed"
    # fixing the spec launches: PolicyDenied is not terminal
    fixed = compute_status(ftj(plan.status), Observed(current_hash="h"), NOW)
    assert fixed.create_job


def test_graft_validate_applies_a_policy_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("allowTrustRemoteCode: false\nmaxGpusPerJob: 0\n")
    example = str(REPO / "examples" / "finetunejob-qlora-gpu.yaml")
    assert main(["validate", "--policy", str(policy), example]) == 1
    out = capsys.readouterr().out
    assert "spec.resources.gpu: 1 GPUs asked, at most 0 per job allowed" in out
    assert "[PolicyDenied]" in out
    assert main(["validate", example]) == 0
    policy.write_text("maxGpuPerJob: 0\n")
    assert main(["validate", "--policy", str(policy), example]) == 2
    assert "maxGpuPerJob: unknown field; did you mean 'maxGpusPerJob'?" in capsys.readouterr().out


def test_the_chart_hands_the_policy_to_the_operator() -> None:
    import json

    from tests.unit.test_chart import operator_env, render

    values = {"policy": {"allowedImages": ["registry.example/"], "maxGpusPerJob": 4}}
    env = operator_env(render(values))
    config = OperatorConfig.from_env({"GRAFT_POLICY": env["GRAFT_POLICY"]})
    assert config.policy.allowed_images == ["registry.example/"]
    assert config.policy.max_gpus_per_job == 4
    assert json.loads(env["GRAFT_POLICY"])["allowTrustRemoteCode"] is True
    with pytest.raises(Exception, match="maxGpus"):
        render({"policy": {"maxGpus": 4}})


def test_a_namespace_pool_and_a_default_deadline_reach_new_jobs() -> None:
    import kubernetes_validate

    obj = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    obj["metadata"].update(namespace="team-a", uid="0123abcd-0000-0000-0000-000000000000")
    obj["spec"]["scheduling"] = {
        "nodeSelector": {"pool": "shared", "disk": "ssd"},
        "tolerations": [{"key": "spot", "operator": "Exists"}],
    }
    policy = parse_policy(
        {
            "defaultActiveDeadlineSeconds": 86400,
            "namespaces": {
                "team-a": {
                    "nodeSelector": {"pool": "tenant-a"},
                    "tolerations": [{"key": "tenant", "value": "a", "effect": "NoSchedule"}],
                }
            },
        }
    )
    config = OperatorConfig(trainer_image="graft/trainer:test", policy=policy)

    def job_of(document: dict[str, Any]) -> dict[str, Any]:
        resolved = planner.resolve_spec(document["spec"], config, "FineTuneJob")
        job = planner.build_trainer_job(document, resolved.spec, config, spec_hash_="h")
        kubernetes_validate.validate(job, "1.28.0", strict=True)
        return job

    job = job_of(obj)
    pod = job["spec"]["template"]["spec"]
    # the platform's pool wins key by key; the spec's other labels stay
    assert pod["nodeSelector"] == {"pool": "tenant-a", "disk": "ssd"}
    assert pod["tolerations"] == [
        {"key": "spot", "operator": "Exists"},
        {"key": "tenant", "operator": "Equal", "value": "a", "effect": "NoSchedule"},
    ]
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    # a spec's own deadline is kept; another namespace gets no pool
    obj["spec"]["activeDeadlineSeconds"] = 3600
    assert job_of(obj)["spec"]["activeDeadlineSeconds"] == 3600
    obj["metadata"]["namespace"] = "team-b"
    resolved = planner.resolve_spec(obj["spec"], config, "FineTuneJob")
    other = planner.build_trainer_job(obj, resolved.spec, config, spec_hash_="h")
    assert other["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "shared", "disk": "ssd"}


def test_a_finetunejob_that_already_ran_is_not_judged_again_when_referenced() -> None:
    # The policy tightened after tone-classifier ran: an OptimizeJob may still export it (the
    # OptimizeJob itself is admitted on its own spec).
    from graft.controller.sources import gate
    from tests.unit.test_controller_sources import CONFIG, finetune, optimize_spec

    strict = dataclasses.replace(
        CONFIG, policy=parse_policy({"allowedImages": ["registry.example/"]})
    )
    source = finetune("tone", image="docker.io/old/trainer:1")
    assert policy_issues(source["spec"], "team", strict.policy)  # it would be denied today
    assert gate("OptimizeJob", "team", optimize_spec(), {"tone": source}, strict).state == "ready"
