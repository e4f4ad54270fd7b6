"""The Helm chart, linted and rendered by the Helm v4 engine (helm-python-sdk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from graft.chart_values import CHART_DIR, values_schema, values_yaml
from graft.crdgen import crd_files
from tests.podsecurity import restricted_violations

LOCAL_VALUES = yaml.safe_load((CHART_DIR.parent / "values-local.yaml").read_text())
NAMESPACED = {"rbac": {"scope": "namespaced"}}
VALUE_SETS = {"default": {}, "namespaced": NAMESPACED, "local": LOCAL_VALUES}


def render(
    values: dict[str, Any], namespace: str = "graft-system", tests: bool = False
) -> list[dict[str, Any]]:
    """What `helm install` applies (with `tests`: also what `helm test` runs)."""
    chart = helm_python.Chart.load(str(CHART_DIR))
    try:
        rendered = chart.render(values, name="graft", namespace=namespace, is_install=True)
    finally:
        chart.close()
    documents = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):  # what `helm install` prints, not a manifest
            continue
        if "/templates/tests/" in path and not tests:
            continue
        documents += [d for d in yaml.safe_load_all(text) if d]
    return documents


def notes(values: dict[str, Any]) -> str:
    chart = helm_python.Chart.load(str(CHART_DIR))
    try:
        rendered = chart.render(values, name="graft", namespace="graft-system", is_install=True)
    finally:
        chart.close()
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def operator_env(documents: list[dict[str, Any]]) -> dict[str, str]:
    """The environment of the operator container in rendered manifests."""
    (deployment,) = by_kind(documents, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]}


def test_generated_values_and_schema_are_current() -> None:
    assert (CHART_DIR / "values.yaml").read_text() == values_yaml(), "run `make crds`"
    assert (CHART_DIR / "values.schema.json").read_text() == values_schema(), "run `make crds`"


def test_chart_crds_are_the_generated_ones() -> None:
    for name, text in crd_files().items():
        assert (CHART_DIR / "files" / "crds" / name).read_text() == text, "run `make crds`"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_lint_is_clean(values: dict[str, Any]) -> None:
    result = helm_python.lint(str(CHART_DIR), values, strict=True, namespace="graft-system")
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_rendered_manifests_match_the_kubernetes_schemas(values: dict[str, Any]) -> None:
    documents = render(values, tests=True)
    assert documents
    for document in documents:
        if document["kind"] == "ServiceMonitor":
            continue
        kubernetes_validate.validate(document, "1.25.0", strict=True)


def test_rendering_is_deterministic() -> None:
    assert render({}) == render({})


def test_unknown_values_are_refused() -> None:
    with pytest.raises(helm_python.HelmError, match="replicas"):
        render({"replicas": 3})


def test_operator_runs_alone_and_restricted() -> None:
    (deployment,) = by_kind(render({}), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    container = pod["containers"][0]
    # the kubelet asks over HTTP, on the pod's address (no Python started per probe)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_local_values_use_local_images_and_the_loopback_api() -> None:
    (deployment,) = by_kind(render(LOCAL_VALUES), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    container = pod["containers"][0]
    assert container["imagePullPolicy"] == "Never"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    # in the host network the probe asks on loopback, never the node's own address
    assert container["livenessProbe"]["httpGet"]["host"] == "127.0.0.1"
    assert env["GRAFT_TRAINER_IMAGE"] == "graft/trainer:dev"
    # Only the host network sets the local values apart from the restricted profile.
    assert restricted_violations(pod, allow_host_network=True) == []


def test_trainer_scratch_values_reach_the_operator() -> None:
    env = operator_env(
        render({"trainer": {"scratchSizeLimit": "200Gi", "ephemeralStorageRequest": "50Gi"}})
    )
    assert env["GRAFT_TRAINER_SCRATCH_SIZE_LIMIT"] == "200Gi"
    assert env["GRAFT_TRAINER_EPHEMERAL_STORAGE_REQUEST"] == "50Gi"
    assert operator_env(render({}))["GRAFT_TRAINER_SCRATCH_SIZE_LIMIT"] == ""
    with pytest.raises(Exception, match="scratchSizeLimit"):
        render({"trainer": {"scratchSizeLimit": "lots"}})


def test_crds_are_kept_on_uninstall_unless_told_otherwise() -> None:
    crds = by_kind(render({}), "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "adapterbundles.graft.dev",
        "finetunejobs.graft.dev",
        "optimizejobs.graft.dev",
    ]
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    unkept = by_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert all("annotations" not in c["metadata"] for c in unkept)
    assert by_kind(render({"crds": {"enabled": False}}), "CustomResourceDefinition") == []


def _rules(documents: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    (role,) = [d for d in by_kind(documents, kind) if d["metadata"]["name"] == name]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_operator_rbac_never_touches_secrets() -> None:
    for values, kind in ((({}, "ClusterRole")), ((NAMESPACED, "Role"))):
        rules = _rules(render(values), kind, "graft")
        resources = {r for rule in rules for r in rule["resources"]}
        assert "secrets" not in resources and "*" not in resources
        assert all("*" not in rule["verbs"] for rule in rules)


def test_namespaced_scope_over_several_namespaces_has_a_role_in_each() -> None:
    values = {**NAMESPACED, "watchNamespaces": ["team-a", "team-b"]}
    documents = render(values, namespace="graft-system")
    env = operator_env(documents)
    assert env["GRAFT_WATCH_NAMESPACES"] == "team-a,team-b"
    roles = {r["metadata"]["namespace"]: r for r in by_kind(documents, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(documents, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for namespace, binding in bindings.items():
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "graft",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "graft", "namespace": "graft-system"}
        ]
        assert roles[namespace]["rules"] == roles["team-a"]["rules"]
    # the only cluster-wide binding is kopf's discovery (CRDs, namespaces): no work rights
    assert [b["roleRef"]["name"] for b in by_kind(documents, "ClusterRoleBinding")] == [
        "graft-discovery"
    ]


def test_namespaced_scope_watches_only_the_release_namespace() -> None:
    documents = render(NAMESPACED, namespace="team-a")
    env = operator_env(documents)
    assert env["GRAFT_WATCH_NAMESPACES"] == "team-a"
    (role,) = by_kind(documents, "Role")
    assert role["metadata"]["namespace"] == "team-a"


def test_trainers_get_no_role_and_the_operator_cannot_bind_one() -> None:
    documents = render({})
    assert not [d for d in by_kind(documents, "ClusterRole") if "trainer" in d["metadata"]["name"]]
    rules = _rules(documents, "ClusterRole", "graft")
    granted = {(r, v) for rule in rules for r in rule["resources"] for v in rule["verbs"]}
    assert ("pods/log", "get") in granted  # the trainer's progress, from its log
    assert not {g for g in granted if g[0] in ("rolebindings", "roles", "clusterroles")}


def test_values_file_documents_every_key() -> None:
    text = (CHART_DIR / "values.yaml").read_text().splitlines()
    keys = [i for i, line in enumerate(text) if line.strip() and not line.strip().startswith("#")]
    assert all(text[i - 1].strip().startswith("#") for i in keys)


def test_schema_file_is_valid_json_schema() -> None:
    import json

    import jsonschema

    schema = json.loads(Path(CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART_DIR / "values.yaml").read_text()), schema)
    jsonschema.validate(LOCAL_VALUES, schema)


PLATFORM = {
    "global": {"imageRegistry": "registry.example"},  # as an umbrella chart passes it
    "imagePullSecrets": ["regcred"],
    "podAnnotations": {"prometheus.io/scrape": "true"},
    "podLabels": {"team": "platform", "app.kubernetes.io/name": "not-graft"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}
                ]
            }
        }
    },
    "priorityClassName": "platform-critical",
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/graft"}},
    "trainer": {
        "pod": {
            "imagePullSecrets": ["trainer-regcred"],
            "nodeSelector": {"accelerator": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "runtimeClassName": "nvidia",
            "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
            "labels": {"cost-center": "ml"},
        }
    },
}


def test_what_platforms_set_reaches_the_operator_pod() -> None:
    documents = render(PLATFORM)
    for document in documents:
        kubernetes_validate.validate(document, "1.28.0", strict=True)
    (deployment,) = by_kind(documents, "Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "platform-critical"
    assert pod["affinity"] == PLATFORM["affinity"]
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    labels = template["metadata"]["labels"]
    # the selector labels win: the Deployment must still select its pod
    assert labels["team"] == "platform"
    for key, value in deployment["spec"]["selector"]["matchLabels"].items():
        assert labels[key] == value
    (account,) = by_kind(documents, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/graft"
    }


def test_hub_values_reach_the_operator() -> None:
    from graft.controller.config import OperatorConfig

    env = operator_env(
        render({"trainer": {"hub": {"endpoint": "https://hub.mirror.internal", "offline": True}}})
    )
    config = OperatorConfig.from_env(env)
    assert (config.hub_endpoint, config.hub_offline) == ("https://hub.mirror.internal", True)
    default = OperatorConfig.from_env(operator_env(render({})))
    assert (default.hub_endpoint, default.hub_offline) == ("", False)
    with pytest.raises(Exception, match="endpoint"):
        render({"trainer": {"hub": {"endpoint": "hub.mirror.internal"}}})


def test_platform_trainer_pod_settings_reach_every_trainer_pod() -> None:
    from graft.controller import planner
    from graft.controller.config import OperatorConfig

    env = operator_env(render(PLATFORM))
    config = OperatorConfig.from_env(
        {"GRAFT_TRAINER_POD": env["GRAFT_TRAINER_POD"], "GRAFT_OUTPUT_URI": "s3://graft/out/"}
    )
    obj = yaml.safe_load((CHART_DIR.parents[1] / "examples" / "finetunejob.yaml").read_text())
    obj["metadata"].update(namespace="team-a", uid="0123abcd-0000")
    obj["spec"]["scheduling"] = {
        "nodeSelector": {"accelerator": "a100"},
        "tolerations": [{"key": "spot", "operator": "Exists"}],
    }
    resolved = planner.resolve_spec(obj["spec"], config, "FineTuneJob", "team-a")
    job = planner.build_trainer_job(obj, resolved.spec, config, spec_hash_="h")
    kubernetes_validate.validate(job, "1.28.0", strict=True)
    template = job["spec"]["template"]
    pod = template["spec"]
    assert pod["imagePullSecrets"] == [{"name": "trainer-regcred"}]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"accelerator": "a100"}  # the spec's own label wins
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists"},
        {"key": "spot", "operator": "Exists"},
    ]
    assert template["metadata"]["annotations"] == {
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"
    }
    assert template["metadata"]["labels"]["cost-center"] == "ml"
    assert template["metadata"]["labels"][planner.LABEL_NAME] == "tone-classifier"
    with pytest.raises(Exception, match="runtimeClass"):
        render({"trainer": {"pod": {"runtimeClass": "nvidia"}}})


def test_install_notes_say_what_is_served_and_where_to_look() -> None:
    text = notes({"watchNamespaces": ["team-a", "team-b"], "output": {"uri": "s3://graft/"}})
    assert "serves namespaces team-a, team-b" in text
    assert "kubectl -n graft-system logs deploy/graft" in text
    assert "Default artifact store: s3://graft/" in text
    assert "serves every namespace" in notes({})
    assert "every resource must set spec.output" in notes({})


def test_trainer_service_account_values_reach_every_namespaces_identity() -> None:
    from graft.controller import planner
    from graft.controller.config import ConfigError, OperatorConfig
    from graft.policy import parse_policy

    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/graft-trainer"}
    env = operator_env(
        render({"trainer": {"serviceAccount": {"name": "ml-trainer", "annotations": role}}})
    )
    config = OperatorConfig.from_env(
        {k: env[k] for k in ("GRAFT_TRAINER_SERVICE_ACCOUNT",)} | {"GRAFT_OUTPUT_URI": "s3://o/"}
    )
    account, *_ = planner.trainer_identity("team-a", config)
    assert account["metadata"]["name"] == "ml-trainer"
    assert account["metadata"]["annotations"] == role
    obj = yaml.safe_load((CHART_DIR.parents[1] / "examples" / "finetunejob.yaml").read_text())
    obj["metadata"].update(namespace="team-a", uid="0123abcd-0000")
    resolved = planner.resolve_spec(obj["spec"], config, "FineTuneJob", "team-a")
    job = planner.build_trainer_job(obj, resolved.spec, config, spec_hash_="h")
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "ml-trainer"
    # A tenant's own role (policy) wins over the platform's, key by key.
    tenant_role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/team-b"}
    policy = parse_policy(
        {"namespaces": {"team-b": {"trainerServiceAccount": {"annotations": tenant_role}}}}
    )
    config = OperatorConfig(**{**config.__dict__, "policy": policy})
    account, *_ = planner.trainer_identity("team-b", config)
    assert account["metadata"]["annotations"] == tenant_role
    assert account["metadata"]["name"] == "ml-trainer"
    # Unset: graft-trainer, no annotations.
    default = OperatorConfig.from_env(operator_env(render({})))
    account, *_ = planner.trainer_identity("team-a", default)
    assert account["metadata"]["name"] == "graft-trainer"
    assert "annotations" not in account["metadata"]
    with pytest.raises(Exception, match="name"):
        render({"trainer": {"serviceAccount": {"name": "Not A Name"}}})
    with pytest.raises(ConfigError, match="GRAFT_TRAINER_SERVICE_ACCOUNT: nmae"):
        OperatorConfig.from_env({"GRAFT_TRAINER_SERVICE_ACCOUNT": '{"nmae": "x"}'})


def test_trainer_metrics_values_reach_the_operator_and_the_pod_monitor() -> None:
    from graft.controller import planner
    from graft.controller.config import OperatorConfig

    values = {
        "trainer": {
            "metrics": {
                "port": 9400,
                "podMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
            }
        }
    }
    documents = render(values)
    (monitor,) = by_kind(documents, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "graft-system"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    # It selects what the planner puts on trainer pods (not the pre-flight pod's component).
    assert spec["selector"]["matchLabels"] == {
        planner.LABEL_MANAGED_BY: "graft-operator",
        planner.LABEL_APP: "graft-trainer",
        planner.LABEL_COMPONENT: "trainer",
    }
    assert {planner.LABEL_NAME, planner.LABEL_TRIAL} <= set(spec["podTargetLabels"])

    env = operator_env(documents)
    assert env["GRAFT_TRAINER_METRICS_PORT"] == "9400"
    config = OperatorConfig.from_env(
        {
            "GRAFT_TRAINER_METRICS_PORT": env["GRAFT_TRAINER_METRICS_PORT"],
            "GRAFT_OUTPUT_URI": "s3://o/",
        }
    )
    obj = yaml.safe_load((CHART_DIR.parents[1] / "examples" / "finetunejob.yaml").read_text())
    obj["metadata"].update(namespace="team-a", uid="0123abcd-0000")
    resolved = planner.resolve_spec(obj["spec"], config, "FineTuneJob", "team-a")
    job = planner.build_trainer_job(obj, resolved.spec, config, spec_hash_="h")
    template = job["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert {"name": planner.METRICS_PORT_ENV, "value": "9400"} in container["env"]
    for key, value in spec["selector"]["matchLabels"].items():
        assert template["metadata"]["labels"][key] == value

    # Watched namespaces only, where the operator watches only some.
    (scoped,) = by_kind(render({**values, "watchNamespaces": ["team-a", "team-b"]}), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    # Off by default: no endpoint, no PodMonitor; a PodMonitor without a port is refused.
    assert by_kind(render({}), "PodMonitor") == []
    assert operator_env(render({}))["GRAFT_TRAINER_METRICS_PORT"] == "0"
    with pytest.raises(helm_python.HelmError, match=r"trainer\.metrics\.port"):
        render({"trainer": {"metrics": {"podMonitor": {"enabled": True}}}})
    with pytest.raises(helm_python.HelmError, match="port"):
        render({"trainer": {"metrics": {"port": 70000}}})


def _helm_test(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [
        d
        for d in by_kind(documents, kind)
        if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"
    ]
    return found


def test_helm_test_creates_its_resource_where_the_operator_watches() -> None:
    # the first watched namespace, else the release namespace, unless tests.namespace says
    cases = [
        ({}, "graft-system"),
        ({"watchNamespaces": ["team-a", "team-b"]}, "team-a"),
        ({"watchNamespaces": ["team-a"], "tests": {"namespace": "team-c"}}, "team-c"),
    ]
    for values, namespace in cases:
        documents = render(values, tests=True)
        pod = _helm_test(documents, "Pod")
        assert pod["metadata"]["namespace"] == "graft-system"
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
        assert env["GRAFT_TEST_NAMESPACE"] == namespace, values
        role = _helm_test(documents, "Role")
        assert role["metadata"]["namespace"] == namespace
        binding = _helm_test(documents, "RoleBinding")
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": pod["spec"]["serviceAccountName"],
                "namespace": "graft-system",
            }
        ]
        # only its own resource: get and delete by name; create cannot be limited by name
        granted = {
            (tuple(r.get("resourceNames") or ()), v) for r in role["rules"] for v in r["verbs"]
        }
        assert granted == {
            ((env["GRAFT_TEST_NAME"],), "get"),
            ((env["GRAFT_TEST_NAME"],), "delete"),
            ((), "create"),
        }


def test_helm_test_pod_is_restricted_and_reaches_the_api_like_the_operator() -> None:
    assert restricted_violations(_helm_test(render({}, tests=True), "Pod")["spec"]) == []
    pod = _helm_test(render(LOCAL_VALUES, tests=True), "Pod")["spec"]
    assert pod["hostNetwork"] is True and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "graft/operator:dev"
    assert container["command"][:2] == ["python", "-c"]
    assert "finetunejobs" in container["command"][2]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert "GRAFT_METRICS_HOST" not in env  # the operator's settings stay the operator's
