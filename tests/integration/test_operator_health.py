"""/healthz (the chart's liveness probe) fails when the operator's watches are dead and the API
server still answers: a proxy in front of the real API server starves every watch stream."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.integration.api_proxy import ApiProxy
from tests.integration.operator_kit import operator_namespace, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(240)]

STALE_SECONDS = 4


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_fails_while_the_watches_starve_and_recovers_when_they_deliver(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("health")
    with (
        ApiProxy(control_plane.kubeconfig) as proxy,
        operator_namespace(
            control_plane,
            tmp,
            KUBECONFIG=str(proxy.kubeconfig(tmp / "kubeconfig")),
            GRAFT_PREFLIGHT_POD="false",
            GRAFT_RESYNC_SECONDS="1",
            GRAFT_WATCH_STALE_SECONDS=str(STALE_SECONDS),
        ) as (op, cluster),
    ):
        port = op.metrics_port
        # Working watches: a resource launches, its status patches come back on the watch.
        cluster.create_ftj("alive")
        wait_for("the Job of alive", lambda: cluster.jobs("alive"), 60)
        wait_for("a Pending phase", lambda: cluster.phase("alive") == "Pending", 30)
        wait_for("a healthy operator", lambda: health(port) == (200, "ok"), 30)

        proxy.starve_watches()
        # The API server still answers: the resync's watch audit lists the resource at its new
        # version, and that version never arrives on the starved watch.
        cluster.patch_ftj("alive", {"suspend": True})
        _code, text = wait_for(
            "a failing /healthz", lambda: (h := health(port))[0] == 503 and h, 30
        )
        assert "the finetunejobs watch in namespace " + cluster.ns in text, text
        assert "graft_stale_watches 1.0" in op.metrics()
        assert op.proc is not None and op.proc.poll() is None  # the probe decides, not us

        proxy.feed_watches()  # kopf reconnects from its last version and catches up
        wait_for("a healthy operator again", lambda: health(port) == (200, "ok"), 60)
        assert "graft_stale_watches 0.0" in op.metrics()
