from __future__ import annotations

from pathlib import Path

from graft.controller.login import api_server_url, login_in_cluster


def test_api_server_url_follows_the_pod_environment() -> None:
    assert api_server_url({}) == "https://kubernetes.default.svc"
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert api_server_url(env) == "https://127.0.0.1:6443"
    assert api_server_url({"KUBERNETES_SERVICE_HOST": "fd00::1"}) == "https://[fd00::1]:443"


def test_login_reads_the_service_account(tmp_path: Path) -> None:
    assert login_in_cluster(tmp_path) is None
    (tmp_path / "token").write_text("abc\n")
    (tmp_path / "namespace").write_text("graft-system")
    info = login_in_cluster(tmp_path)
    assert info is not None
    assert info.token == "abc" and info.default_namespace == "graft-system"
    assert info.ca_path is None
