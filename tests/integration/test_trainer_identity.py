"""A trainer pod's identity holds no API rights: it cannot write any resource's status, its own
included (the operator alone writes status, from the pod's log and termination message), nor
read Secrets. Enforced by the real API server."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from graft.controller import planner
from graft.controller.config import OperatorConfig
from tests.integration.operator_kit import REPO, Cluster, service_account_client

pytestmark = pytest.mark.integration


def test_the_trainer_identity_cannot_write_status_or_read_secrets(control_plane: Any) -> None:
    from kubernetes import client, utils

    control_plane.kubectl("apply", "-f", str(REPO / "crds"))
    api = control_plane.api_client()
    ns = f"ident-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(api, ns)
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        manifests = planner.trainer_identity(ns, OperatorConfig())
        assert [m["kind"] for m in manifests] == ["ServiceAccount"]  # nothing bound to it
        for manifest in manifests:
            utils.create_from_dict(api, manifest)
        cluster.create_ftj("mine")
        cluster.create_ftj("theirs")
        as_trainer = service_account_client(api, ns, "graft-trainer")
        trainer = client.CustomObjectsApi(as_trainer)

        forged = {"status": {"conditions": [], "artifacts": {"adapter": "s3://x/"}}}
        for name in ("mine", "theirs"):
            with pytest.raises(client.ApiException) as refused:
                trainer.patch_namespaced_custom_object_status(
                    "graft.dev", "v1alpha1", ns, "finetunejobs", name, forged
                )
            assert refused.value.status == 403
            with pytest.raises(client.ApiException) as spec_patch:
                trainer.patch_namespaced_custom_object(
                    "graft.dev", "v1alpha1", ns, "finetunejobs", name, {"spec": {"suspend": True}}
                )
            assert spec_patch.value.status == 403
            obj = cluster.ftj(name)
            assert obj is not None and "artifacts" not in (obj.get("status") or {})
        with pytest.raises(client.ApiException) as secrets:
            client.CoreV1Api(as_trainer).list_namespaced_secret(ns)
        assert secrets.value.status == 403
    finally:
        cluster.core.delete_namespace(ns)
