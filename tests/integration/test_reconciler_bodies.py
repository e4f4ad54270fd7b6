"""The reconciler against the real API server: a resource it remembers but that is gone (its
DELETED event lost, as across a watch reconnect) is read again instead of failing forever."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import yaml

from graft.controller.config import OperatorConfig
from graft.controller.kube import Kube, resource_path
from graft.controller.reconciler import Reconciler
from tests.integration.operator_kit import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_remembered_resource_that_is_gone_is_read_again(control_plane: Any) -> None:
    control_plane.kubectl("apply", "-f", str(REPO / "crds"))
    ns = f"bodies-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", ns)
    ftj = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    ftj["metadata"] = {"name": "ghost", "namespace": ns}
    ftj["spec"]["suspend"] = True  # nothing to launch: the pass patches the status
    key = ("FineTuneJob", ns, "ghost")

    async def scenario() -> tuple[float | None, bool, float | None]:
        kube = await Kube.connect(str(control_plane.kubeconfig))
        try:
            await kube.request("POST", resource_path(ns), ftj)
            reconciler = Reconciler(kube, OperatorConfig())
            reconciler.observe(key, await kube.get(resource_path(ns, "ghost")))
            assert await kube.delete(resource_path(ns, "ghost"))  # the watch never says so
            first = await reconciler(key)  # the status patch meets a 404
            remembered = key in reconciler.bodies
            second = await reconciler(key)  # read from the API: gone, nothing to do
            return first, remembered, second
        finally:
            await kube.close()

    try:
        first, remembered, second = asyncio.run(scenario())
    finally:
        control_plane.kubectl("delete", "namespace", ns, "--wait=false")
    assert first == 0.0 and not remembered
    assert second is None
