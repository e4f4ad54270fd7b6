"""The chart's RBAC on a real API server: the operator's ServiceAccount, bound as the chart
binds it, can do what the operator needs and nothing more (no Secret data, no escalation)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import helm_python
import pytest

from graft.chart_values import CHART_DIR
from tests.fixtures.cluster import ClusterInfo

pytestmark = pytest.mark.integration


def _release(control_plane: ClusterInfo, values: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    from kubernetes import client as k8s

    api = control_plane.api_client()
    name = f"graft-rbac-{uuid.uuid4().hex[:6]}"
    namespace = name
    core = k8s.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    helm = helm_python.Config(kubeconfig_path=str(control_plane.kubeconfig), namespace=namespace)
    # CRDs are left to the other tests here; chart-managed CRDs are covered by the e2e install.
    # The operator pod must not run (on a full cluster it would dial the service network):
    # an image that is never pulled keeps it waiting while the RBAC objects are checked.
    never = {"repository": "graft/operator", "tag": "rbac-test-absent", "pullPolicy": "Never"}
    helm.install(
        str(CHART_DIR), name, {"crds": {"enabled": False}, "image": never, **values}, timeout=60
    )
    try:
        yield name, namespace, api
    finally:
        helm.uninstall(name, timeout=60)
        core.delete_namespace(namespace)


@pytest.fixture(scope="module")
def cluster_release(control_plane: ClusterInfo) -> Iterator[tuple[str, str, Any]]:
    yield from _release(control_plane, {})


@pytest.fixture(scope="module")
def namespaced_release(control_plane: ClusterInfo) -> Iterator[tuple[str, str, Any]]:
    yield from _release(control_plane, {"rbac": {"scope": "namespaced"}})


def allowed(
    api: Any,
    user: str,
    verb: str,
    resource: str,
    namespace: str | None = None,
    group: str = "",
    subresource: str = "",
    name: str = "",
) -> bool:
    from kubernetes import client as k8s

    review = k8s.AuthorizationV1Api(api).create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "resourceAttributes": {
                    "verb": verb,
                    "resource": resource,
                    "group": group,
                    "subresource": subresource,
                    "namespace": namespace or "",
                    "name": name,
                },
            },
        }
    )
    return bool(review.status.allowed)


NEEDED = [
    ("watch", "finetunejobs", "graft.dev", ""),
    ("patch", "finetunejobs", "graft.dev", "status"),
    ("patch", "adapterbundles", "graft.dev", "status"),
    ("delete", "optimizejobs", "graft.dev", ""),
    ("create", "jobs", "batch", ""),
    ("delete", "jobs", "batch", ""),
    ("list", "pods", "", ""),
    ("create", "configmaps", "", ""),
    ("patch", "configmaps", "", ""),
    ("create", "events", "", ""),
    ("list", "events", "", ""),
    ("create", "serviceaccounts", "", ""),
    ("create", "services", "", ""),
    ("get", "pods", "", "log"),
]
REFUSED = [
    ("get", "secrets", "", ""),
    ("list", "secrets", "", ""),
    ("watch", "secrets", "", ""),
    ("create", "pods", "", ""),
    ("create", "roles", "rbac.authorization.k8s.io", ""),
    ("update", "finetunejobs", "graft.dev", ""),
    ("delete", "namespaces", "", ""),
    # Verbs the operator's code never uses (test_operator_least_privilege.py shows which it does).
    ("patch", "finetunejobs", "graft.dev", ""),
    ("get", "finetunejobs", "graft.dev", "status"),
    ("update", "optimizejobs", "graft.dev", "status"),
    ("get", "pods", "", ""),
    ("delete", "pods", "", ""),
    ("delete", "configmaps", "", ""),
    ("patch", "events", "", ""),
    ("create", "events", "events.k8s.io", ""),
    ("get", "serviceaccounts", "", ""),
    ("delete", "services", "", ""),
    ("get", "rolebindings", "rbac.authorization.k8s.io", ""),
    ("create", "rolebindings", "rbac.authorization.k8s.io", ""),
    ("get", "pods", "", "exec"),
    ("create", "pods", "", "exec"),
]


def test_operator_can_do_its_work_in_any_namespace(cluster_release: tuple[str, str, Any]) -> None:
    name, namespace, api = cluster_release
    user = f"system:serviceaccount:{namespace}:{name}"
    for verb, resource, group, sub in NEEDED:
        assert allowed(api, user, verb, resource, "team-a", group, sub), (verb, resource, sub)
    assert allowed(api, user, "list", "customresourcedefinitions", group="apiextensions.k8s.io")
    # Serving all namespaces, kopf never reads namespaces: the chart does not grant it.
    assert not allowed(api, user, "list", "namespaces")


def test_operator_is_refused_secrets_and_escalation(cluster_release: tuple[str, str, Any]) -> None:
    name, namespace, api = cluster_release
    user = f"system:serviceaccount:{namespace}:{name}"
    for verb, resource, group, sub in REFUSED:
        assert not allowed(api, user, verb, resource, "team-a", group, sub), (verb, resource)
    rbac = "rbac.authorization.k8s.io"
    for role in (f"{name}-trainer", "cluster-admin", "edit"):
        assert not allowed(api, user, "bind", "clusterroles", group=rbac, name=role)


def test_operator_can_bind_no_role_and_its_trainers_hold_none(
    cluster_release: tuple[str, str, Any], control_plane: ClusterInfo
) -> None:
    """The real escalation check, not a review: act as the operator and try a binding; the
    trainer identity it creates holds nothing."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    name, namespace, _ = cluster_release
    as_operator = control_plane.api_client()
    as_operator.set_default_header("Impersonate-User", f"system:serviceaccount:{namespace}:{name}")
    binding = {
        "metadata": {"name": "graft-trainer-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "graft-trainer", "namespace": namespace}],
    }
    with pytest.raises(ApiException) as caught:
        k8s.RbacAuthorizationV1Api(as_operator).create_namespaced_role_binding(namespace, binding)
    assert caught.value.status == 403
    with pytest.raises(ApiException) as caught:
        k8s.CoreV1Api(as_operator).list_namespaced_secret(namespace)
    assert caught.value.status == 403
    admin = control_plane.api_client()
    trainer = f"system:serviceaccount:{namespace}:graft-trainer"
    for sub in ("status", ""):
        assert not allowed(admin, trainer, "patch", "finetunejobs", namespace, "graft.dev", sub)
    assert not allowed(admin, trainer, "get", "secrets", namespace)


def test_namespaced_scope_stays_in_its_namespace(
    namespaced_release: tuple[str, str, Any],
) -> None:
    name, namespace, api = namespaced_release
    user = f"system:serviceaccount:{namespace}:{name}"
    assert allowed(api, user, "create", "jobs", namespace, "batch")
    assert allowed(api, user, "patch", "finetunejobs", namespace, "graft.dev", "status")
    assert not allowed(api, user, "create", "jobs", "team-a", "batch")
    assert not allowed(api, user, "get", "secrets", namespace)
    # Serving named namespaces, kopf lists and watches namespaces to find them.
    assert allowed(api, user, "watch", "namespaces")


def test_namespaced_scope_over_two_namespaces_reaches_those_only(
    control_plane: ClusterInfo,
) -> None:
    from kubernetes import client as k8s

    core = k8s.CoreV1Api(control_plane.api_client())
    tenants = [f"tenant-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for tenant in tenants:
        core.create_namespace({"metadata": {"name": tenant}})
    try:
        values = {"rbac": {"scope": "namespaced"}, "watchNamespaces": tenants}
        with contextlib.contextmanager(_release)(control_plane, values) as (name, namespace, api):
            user = f"system:serviceaccount:{namespace}:{name}"
            for tenant in tenants:
                for verb, resource, group, sub in NEEDED:
                    assert allowed(api, user, verb, resource, tenant, group, sub), (tenant, verb)
                assert not allowed(api, user, "get", "secrets", tenant)
            # neither a third namespace nor its own: it serves the two it was given
            for other in ("team-c", namespace):
                assert not allowed(api, user, "create", "jobs", other, "batch"), other
                assert not allowed(api, user, "list", "pods", other), other
            assert not allowed(api, user, "get", "secrets", "team-c")
    finally:
        for tenant in tenants:
            core.delete_namespace(tenant)
