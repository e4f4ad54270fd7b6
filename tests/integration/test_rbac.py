"""RBAC is really enforced by the local apiserver: a ServiceAccount with a narrow Role is refused
anything outside it."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.operator_kit import service_account_client

pytestmark = pytest.mark.integration


def test_narrow_role_is_enforced(control_plane) -> None:
    from kubernetes import client

    api = control_plane.api_client()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    ns = f"rbac-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        core.create_namespaced_service_account(
            ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="narrow"))
        )
        rbac.create_namespaced_role(
            ns,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="configmap-reader"),
                rules=[
                    client.V1PolicyRule(
                        api_groups=[""], resources=["configmaps"], verbs=["get", "list"]
                    )
                ],
            ),
        )
        rbac.create_namespaced_role_binding(
            ns,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="narrow-reads-configmaps"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"
                ),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="narrow", namespace=ns)],
            ),
        )
        narrow = client.CoreV1Api(service_account_client(api, ns, "narrow"))

        # inside the Role: allowed
        assert narrow.list_namespaced_config_map(ns).items is not None
        # outside it: another verb, another resource, another namespace
        with pytest.raises(client.ApiException) as e1:
            narrow.create_namespaced_config_map(
                ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="nope"))
            )
        assert e1.value.status == 403
        with pytest.raises(client.ApiException) as e2:
            narrow.list_namespaced_secret(ns)
        assert e2.value.status == 403
        with pytest.raises(client.ApiException) as e3:
            narrow.list_namespaced_config_map("default")
        assert e3.value.status == 403
        # the refusal names the service account: the token was authenticated, not anonymous
        assert f"system:serviceaccount:{ns}:narrow" in (e1.value.body or "")
    finally:
        core.delete_namespace(ns)
