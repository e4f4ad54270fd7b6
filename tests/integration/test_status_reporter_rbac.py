"""The trainer identity the operator sets up lets the reporter patch its resource's status and
nothing more (RBAC enforced by the real apiserver)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from graft.api.finetune import FineTuneProgress
from graft.controller import planner
from graft.controller.config import OperatorConfig
from graft.progress import ProgressEvent
from graft_trainer.status_reporter import KubernetesStatusReporter
from tests.integration.operator_kit import REPO, Cluster

pytestmark = pytest.mark.integration


def test_reporter_patches_status_with_the_narrow_identity(
    control_plane: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes import client, utils

    control_plane.kubectl("apply", "-f", str(REPO / "crds"))
    api = control_plane.api_client()
    ns = f"rep-{uuid.uuid4().hex[:6]}"
    cluster = Cluster(api, ns)
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    try:
        for manifest in planner.trainer_identity(ns, OperatorConfig()):
            utils.create_from_dict(api, manifest)
        cluster.create_ftj("tone")
        token = cluster.core.create_namespaced_service_account_token(
            "graft-trainer",
            ns,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
            ),
        ).status.token
        cfg = client.Configuration()
        cfg.host = api.configuration.host
        cfg.ssl_ca_cert = api.configuration.ssl_ca_cert
        cfg.api_key = {"authorization": f"Bearer {token}"}
        narrow = client.CustomObjectsApi(client.ApiClient(cfg))

        monkeypatch.setenv("GRAFT_RESOURCE_KIND", "FineTuneJob")
        monkeypatch.setenv("GRAFT_RESOURCE_NAME", "tone")
        monkeypatch.setenv("GRAFT_RESOURCE_NAMESPACE", ns)
        reporter = KubernetesStatusReporter(narrow)
        reporter.report(
            ProgressEvent(
                stage="training", progress=FineTuneProgress(step=7, total_steps=10, percent=70)
            )
        )
        reporter.close()
        assert reporter.patches == 1
        obj = cluster.ftj("tone")
        assert obj is not None and obj["status"]["progress"]["percent"] == 70

        # Nothing else: not the spec, not a Secret, not a Job.
        with pytest.raises(client.ApiException) as spec_patch:
            narrow.patch_namespaced_custom_object(
                "graft.dev", "v1alpha1", ns, "finetunejobs", "tone", {"spec": {"suspend": True}}
            )
        assert spec_patch.value.status == 403
        narrow_core = client.CoreV1Api(client.ApiClient(cfg))
        with pytest.raises(client.ApiException) as secrets:
            narrow_core.list_namespaced_secret(ns)
        assert secrets.value.status == 403
    finally:
        cluster.core.delete_namespace(ns)
