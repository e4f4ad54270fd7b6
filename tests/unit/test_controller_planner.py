"""The pure planner: validated spec -> ConfigMap, Job and trainer identity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.api.kinds import InvalidResource
from graft.controller import planner
from graft.controller.config import ConfigError, OperatorConfig
from graft.naming import artifact_prefix
from tests.podsecurity import restricted_violations

REPO = Path(__file__).resolve().parents[2]
UID = "0123abcd-4567-89ef-0123-456789abcdef"


def resource(**spec_overrides: Any) -> dict[str, Any]:
    obj = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    obj["metadata"].update(
        namespace="team-a",
        uid=UID,
        generation=1,
        labels={"app.kubernetes.io/instance": "argo-app"},
    )
    obj["spec"].update(spec_overrides)
    return obj


CONFIG = OperatorConfig(
    trainer_image="graft/trainer:test",
    output_uri="s3://default-bucket/graft/",
    output_secret="default-s3",
    trainer_extra_env={"KUBERNETES_SERVICE_HOST": "127.0.0.1"},
    trainer_host_network=True,
)


def job_for(obj: dict[str, Any], config: OperatorConfig = CONFIG) -> dict[str, Any]:
    resolved = planner.resolve_spec(obj["spec"], config)
    return planner.build_trainer_job(obj, resolved.spec, config, spec_hash_=resolved.spec_hash)


def test_job_has_deterministic_name_owner_and_explicit_labels() -> None:
    obj = resource()
    job = job_for(obj)
    assert job["metadata"]["name"] == "tone-classifier-train" == job_for(obj)["metadata"]["name"]
    owner = job["metadata"]["ownerReferences"][0]
    assert owner == {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "tone-classifier",
        "uid": UID,
        "controller": True,
    }
    labels = job["metadata"]["labels"]
    assert labels[planner.LABEL_NAME] == "tone-classifier"
    assert labels[planner.LABEL_UID] == UID
    assert "app.kubernetes.io/instance" not in labels
    assert job["spec"]["template"]["metadata"]["labels"][planner.LABEL_NAME] == "tone-classifier"


def test_pod_contract_with_the_trainer() -> None:
    obj = resource()
    job = job_for(obj)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["graft-trainer", "run-resource", "/etc/graft/resource.json"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GRAFT_ARTIFACTS_URI"] == artifact_prefix(
        "s3://graft-artifacts/artifacts/", "team-a", "FineTuneJob", "tone-classifier", UID
    )
    assert env["GRAFT_REPORTER"] == "jsonl"  # progress on stdout, read by the operator
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    # Secrets by reference only: the name, never a value.
    assert container["envFrom"] == [{"secretRef": {"name": "graft-s3", "optional": False}}]
    assert not any("valueFrom" in e for e in container["env"])
    # Status and Events hear only what the trainer wrote (redacted), never the raw log tail.
    assert container["terminationMessagePolicy"] == "File"
    # Every variable the operator sets is configuration the trainer does not redact, so what
    # it reports still names its artifact prefix.
    from graft_trainer.redaction import secret_values

    assert secret_values(env) == []
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "graft-trainer"
    assert pod["hostNetwork"] is True
    assert container["image"] == "graft/trainer:test"
    assert {v["name"]: v for v in pod["volumes"]}["spec"]["configMap"]["name"] == (
        "tone-classifier-spec"
    )


def test_pod_meets_restricted_pod_security() -> None:
    pod = job_for(resource())["spec"]["template"]["spec"]
    assert restricted_violations(pod, allow_host_network=True) == []
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    no_host = job_for(resource(), OperatorConfig(output_uri="s3://b/"))
    assert restricted_violations(no_host["spec"]["template"]["spec"]) == []


def test_resources_scheduling_and_limits() -> None:
    obj = resource(
        resources={"gpu": 2, "gpuResourceName": "amd.com/gpu", "cpu": 8, "memory": "64Gi"},
        scheduling={
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"x": 1}},
            "priorityClassName": "high",
            "queueName": "team-a-queue",
        },
        backoffLimit=3,
        activeDeadlineSeconds=600,
        image="my/trainer:1",
    )
    job = job_for(obj)
    pod = job["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"] == {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "2"}
    assert res["requests"] == res["limits"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["priorityClassName"] == "high"
    assert job["metadata"]["labels"][planner.KUEUE_QUEUE] == "team-a-queue"
    assert job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["backoffLimit"] == 3 + CONFIG.disruption_allowance
    assert pod["containers"][0]["image"] == "my/trainer:1"
    # Two GPUs: two training processes, which need a shared memory bigger than the default.
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    one_gpu = job_for(resource(resources={"gpu": 1}))["spec"]["template"]["spec"]
    assert all(v["name"] != "dshm" for v in one_gpu["volumes"])


def test_configmap_holds_whole_resource_with_defaults() -> None:
    obj = resource()
    del obj["spec"]["output"]
    resolved = planner.resolve_spec(obj["spec"], CONFIG)
    cm = planner.build_spec_configmap(obj, resolved)
    doc = json.loads(cm["data"]["resource.json"])
    assert doc["apiVersion"] == "graft.dev/v1alpha1" and doc["kind"] == "FineTuneJob"
    assert doc["metadata"] == {
        "name": "tone-classifier",
        "namespace": "team-a",
        "uid": UID,
        "generation": 1,
    }
    assert doc["spec"]["output"] == {
        "uri": "s3://default-bucket/graft/",
        "credentialsSecret": "default-s3",
    }
    assert doc["spec"]["training"]["lrScheduler"] == "cosine"  # a default applied
    assert cm["metadata"]["ownerReferences"][0]["uid"] == UID
    spec, spec_hash = planner.launched_spec(cm)
    assert spec == resolved.spec and spec_hash == resolved.spec_hash
    envfrom = planner.build_trainer_job(obj, spec, CONFIG, spec_hash_=spec_hash)["spec"][
        "template"
    ]["spec"]["containers"][0]["envFrom"]
    assert [e["secretRef"]["name"] for e in envfrom] == ["graft-s3", "default-s3"]


def test_invalid_spec_names_the_field() -> None:
    obj = resource(resources={"gpu": -1})
    with pytest.raises(InvalidResource) as exc:
        planner.resolve_spec(obj["spec"], CONFIG)
    assert any(i.dotted == "spec.resources.gpu" for i in exc.value.issues)
    obj = resource()
    del obj["spec"]["output"]
    with pytest.raises(InvalidResource) as exc:
        planner.resolve_spec(obj["spec"], OperatorConfig())
    assert exc.value.issues[0].dotted == "spec.output"


def test_spec_hash_ignores_suspend_and_ttl_only() -> None:
    base = planner.resolve_spec(resource()["spec"], CONFIG).spec_hash
    assert planner.resolve_spec(resource(suspend=True)["spec"], CONFIG).spec_hash == base
    ttl = resource(ttlSecondsAfterFinished=5)
    assert planner.resolve_spec(ttl["spec"], CONFIG).spec_hash == base
    assert planner.resolve_spec(resource(backoffLimit=5)["spec"], CONFIG).spec_hash != base
    a = planner.resolve_spec(resource()["spec"], CONFIG).spec
    b = planner.resolve_spec(resource(backoffLimit=5, suspend=True)["spec"], CONFIG).spec
    b["training"]["maxSteps"] = 7
    assert planner.changed_fields(a, b) == ["spec.backoffLimit", "spec.training.maxSteps"]


def test_trainer_identity_is_a_service_account_with_no_rights() -> None:
    objs = planner.trainer_identity("team-a", OperatorConfig())
    assert [o["kind"] for o in objs] == ["ServiceAccount"]
    assert objs[0]["metadata"]["name"] == "graft-trainer"


def test_config_from_env() -> None:
    cfg = OperatorConfig.from_env(
        {
            "GRAFT_TRAINER_IMAGE": "x/y:1",
            "GRAFT_WATCH_NAMESPACES": "a, b,",
            "GRAFT_TRAINER_EXTRA_ENV": '{"KUBERNETES_SERVICE_PORT": 6443}',
            "GRAFT_TRAINER_HOST_NETWORK": "true",
            "GRAFT_METRICS_PORT": "9090",
            "GRAFT_LOG_FORMAT": "text",
        }
    )
    assert cfg.trainer_image == "x/y:1"
    assert cfg.watch_namespaces == ("a", "b")
    assert cfg.trainer_extra_env == {"KUBERNETES_SERVICE_PORT": "6443"}
    assert cfg.trainer_host_network and cfg.metrics_port == 9090 and cfg.log_format == "text"
    assert OperatorConfig.from_env({}).watch_namespaces == ()
    for bad in (
        {"GRAFT_LOG_FORMAT": "xml"},
        {"GRAFT_TRAINER_EXTRA_ENV": "[1]"},
        {"GRAFT_METRICS_PORT": "x"},
        {"GRAFT_TRAINER_SCRATCH_SIZE_LIMIT": "lots"},
        {"GRAFT_TRAINER_EPHEMERAL_STORAGE_REQUEST": "20 GB"},
    ):
        with pytest.raises(ConfigError):
            OperatorConfig.from_env(bad)


def test_scratch_disk_is_bounded_when_the_platform_says_so() -> None:
    import dataclasses

    import kubernetes_validate

    def scratch(config: OperatorConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        job = job_for(resource(), config)
        pod = job["spec"]["template"]["spec"]
        kubernetes_validate.validate(job, "1.28.0", strict=True)
        volumes = {v["name"]: v for v in pod["volumes"]}
        return volumes["tmp"]["emptyDir"], volumes["home"]["emptyDir"], pod["containers"][0]

    tmp, home, container = scratch(CONFIG)
    assert tmp == home == {}
    assert "ephemeral-storage" not in container["resources"].get("requests", {})
    bounded = OperatorConfig.from_env(
        {
            "GRAFT_TRAINER_SCRATCH_SIZE_LIMIT": "200Gi",
            "GRAFT_TRAINER_EPHEMERAL_STORAGE_REQUEST": "50Gi",
        }
    )
    config = dataclasses.replace(
        CONFIG,
        trainer_scratch_size_limit=bounded.trainer_scratch_size_limit,
        trainer_ephemeral_storage_request=bounded.trainer_ephemeral_storage_request,
    )
    tmp, home, container = scratch(config)
    assert tmp == home == {"sizeLimit": "200Gi"}
    assert container["resources"]["requests"]["ephemeral-storage"] == "50Gi"
    # the request sits beside the spec's own cpu and memory, which stay requests and limits
    assert container["resources"]["limits"].keys() >= {"cpu", "memory"}


def test_locations_with_different_secrets_get_per_bucket_credentials() -> None:
    obj = resource()
    spec = obj["spec"]
    spec["model"] = {"uri": "s3://models/tiny/", "credentialsSecret": "models-ro"}
    spec["dataset"]["uri"] = "s3://datasets/phrases.jsonl"
    spec["dataset"]["credentialsSecret"] = "data-ro"
    spec["output"] = {"uri": "s3://results/graft/", "credentialsSecret": "results-rw"}
    container = job_for(obj)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    buckets = json.loads(env["GRAFT_S3_BUCKET_CREDENTIALS"]["value"])
    assert buckets == {
        "models": "GRAFT_SECRET_0_",
        "datasets": "GRAFT_SECRET_1_",
        "results": "GRAFT_SECRET_2_",
    }
    ref = env["GRAFT_SECRET_1_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "data-ro", "key": "AWS_SECRET_ACCESS_KEY", "optional": True}
    # Still by reference only: no variable carries a value out of a Secret.
    assert all("value" not in e for e in container["env"] if "valueFrom" in e)
    # The output's Secret stays last in envFrom: its plain variables win elsewhere.
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == [
        "models-ro",
        "data-ro",
        "results-rw",
    ]


def test_hf_locations_with_different_secrets_get_their_own_tokens() -> None:
    obj = resource()
    spec = obj["spec"]
    spec["model"] = {"uri": "hf://acme/private-llm", "credentialsSecret": "hf-acme"}
    spec["dataset"]["uri"] = "hf://partner/labelled-tones"
    spec["dataset"]["credentialsSecret"] = "hf-partner"
    spec["output"] = {"uri": "s3://results/graft/", "credentialsSecret": "results-rw"}
    container = job_for(obj)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert json.loads(env["GRAFT_HF_TOKENS"]["value"]) == {
        "acme/private-llm": "GRAFT_SECRET_0_HF_TOKEN",
        "partner/labelled-tones": "GRAFT_SECRET_1_HF_TOKEN",
    }
    ref = env["GRAFT_SECRET_1_HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "hf-partner", "key": "HF_TOKEN", "optional": True}
    assert "GRAFT_SECRET_2_HF_TOKEN" not in env  # the S3 output's Secret holds no token
    # One Secret for everything: its plain HF_TOKEN (envFrom) serves every repository.
    single = resource()
    single["spec"]["model"] = {"uri": "hf://acme/private-llm", "credentialsSecret": "hf-acme"}
    single["spec"]["output"] = {"uri": "s3://results/graft/", "credentialsSecret": "hf-acme"}
    single["spec"]["dataset"].pop("credentialsSecret", None)
    plain_env = job_for(single)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert all(e["name"] != "GRAFT_HF_TOKENS" for e in plain_env)


def test_the_publish_repositorys_token_reaches_the_pod_by_reference() -> None:
    """spec.publish's Secret is one more location's: envFrom it (before the output's, which
    stays last) and, beside another Hub Secret, its HF_TOKEN mapped to the repository."""
    obj = resource()
    spec = obj["spec"]
    spec["model"] = {"uri": "hf://acme/private-llm", "credentialsSecret": "hf-read"}
    spec["dataset"].pop("credentialsSecret", None)
    spec["publish"] = {"uri": "hf://acme/tone-adapter", "credentialsSecret": "hf-write"}
    spec["output"] = {"uri": "s3://results/graft/", "credentialsSecret": "results-rw"}
    container = job_for(obj)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert json.loads(env["GRAFT_HF_TOKENS"]["value"]) == {
        "acme/private-llm": "GRAFT_SECRET_0_HF_TOKEN",
        "acme/tone-adapter": "GRAFT_SECRET_1_HF_TOKEN",
    }
    ref = env["GRAFT_SECRET_1_HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "hf-write", "key": "HF_TOKEN", "optional": True}
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == [
        "hf-read",
        "hf-write",
        "results-rw",
    ]
    assert all("value" not in e for e in container["env"] if "valueFrom" in e)


def test_trainer_pods_fetch_hf_sources_where_the_platform_says() -> None:
    """GRAFT_HF_ENDPOINT / GRAFT_HF_OFFLINE (the chart's trainer.hub) become the pods'
    HF_ENDPOINT and HF_HUB_OFFLINE; online unless asked, whatever the image bakes in."""

    def hub_vars(env: dict[str, str]) -> dict[str, str]:
        config = OperatorConfig.from_env(env)
        container = job_for(resource(), config)["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("HF_")}

    assert hub_vars({}) == {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    mirror = hub_vars(
        {"GRAFT_HF_ENDPOINT": "https://hub.mirror.internal/", "GRAFT_HF_OFFLINE": "true"}
    )
    assert mirror == {
        "HF_ENDPOINT": "https://hub.mirror.internal",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    with pytest.raises(ConfigError, match="GRAFT_HF_ENDPOINT"):
        OperatorConfig.from_env({"GRAFT_HF_ENDPOINT": "hub.mirror.internal"})


def test_a_shared_cache_claim_is_mounted_as_the_download_cache() -> None:
    """trainer.modelCache.claim (GRAFT_MODEL_CACHE_CLAIM) for every pod; a resource's
    resources.cacheClaim overrides it, and an empty one turns it off."""
    import dataclasses

    import kubernetes_validate

    def cache_of(obj: dict[str, Any], config: OperatorConfig) -> tuple[Any, dict[str, str]]:
        job = job_for(obj, config)
        kubernetes_validate.validate(job, "1.28.0", strict=True)
        pod = job["spec"]["template"]["spec"]
        volume = [v for v in pod["volumes"] if v["name"] == "model-cache"]
        env = {e["name"]: e.get("value", "") for e in pod["containers"][0]["env"]}
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model-cache"]
        assert len(mounts) == len(volume)
        return (volume[0]["persistentVolumeClaim"]["claimName"] if volume else None), env

    platform = dataclasses.replace(CONFIG, model_cache_claim="models")
    claim, env = cache_of(resource(), platform)
    assert claim == "models"
    assert env["GRAFT_CACHE_DIR"] == "/var/cache/graft/graft"
    assert env["HF_HUB_CACHE"] == "/var/cache/graft/hub"
    own = resource(resources={"cpu": "1", "cacheClaim": "team-cache"})
    assert cache_of(own, platform)[0] == "team-cache"
    assert cache_of(own, CONFIG)[0] == "team-cache"
    off, env = cache_of(resource(resources={"cpu": "1", "cacheClaim": ""}), platform)
    assert off is None and "GRAFT_CACHE_DIR" not in env
    assert cache_of(resource(), CONFIG)[0] is None


def test_trainer_metrics_port_and_variable_only_when_the_platform_sets_a_port() -> None:
    import dataclasses

    import kubernetes_validate

    def container_of(job: dict[str, Any]) -> dict[str, Any]:
        container: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
        return container

    def env_of(job: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in container_of(job)["env"]}

    pod_network = dataclasses.replace(CONFIG, trainer_host_network=False)
    off = job_for(resource(), pod_network)
    assert "ports" not in container_of(off)
    assert planner.METRICS_PORT_ENV not in env_of(off)

    on_config = dataclasses.replace(pod_network, trainer_metrics_port=9400)
    on = job_for(resource(), on_config)
    kubernetes_validate.validate(on, "1.28.0", strict=True)
    assert container_of(on)["ports"] == [
        {"name": "metrics", "containerPort": 9400, "protocol": "TCP"}
    ]
    assert env_of(on)[planner.METRICS_PORT_ENV] == "9400"
    assert restricted_violations(on["spec"]["template"]["spec"]) == []
    # Search trials serve theirs too; the labels are what the chart's PodMonitor selects.
    obj = resource()
    resolved = planner.resolve_spec(obj["spec"], on_config)
    trial = planner.build_trainer_job(obj, resolved.spec, on_config, spec_hash_="h", trial=3)
    assert container_of(trial)["ports"][0]["name"] == "metrics"
    labels = trial["spec"]["template"]["metadata"]["labels"]
    assert labels[planner.LABEL_COMPONENT] == "trainer"
    assert labels[planner.LABEL_APP] == "graft-trainer"
    assert labels[planner.LABEL_MANAGED_BY] == "graft-operator"

    # In the host network a declared port is a host port (one trainer pod per node): the
    # trainer is told the port, nothing is declared.
    host = job_for(resource(), dataclasses.replace(on_config, trainer_host_network=True))
    assert "ports" not in container_of(host)
    assert env_of(host)[planner.METRICS_PORT_ENV] == "9400"

    # The pre-flight pod runs checks only: no endpoint, no port.
    check = planner.build_preflight_job(obj, resolved.spec, on_config, spec_hash_="h")
    assert "ports" not in container_of(check)
    assert planner.METRICS_PORT_ENV not in env_of(check)

    assert OperatorConfig.from_env({"GRAFT_TRAINER_METRICS_PORT": "9400"}).trainer_metrics_port == (
        9400
    )
    assert OperatorConfig.from_env({}).trainer_metrics_port == 0
    for bad in ("70000", "-1", "port"):
        with pytest.raises(ConfigError, match="GRAFT_TRAINER_METRICS_PORT"):
            OperatorConfig.from_env({"GRAFT_TRAINER_METRICS_PORT": bad})
