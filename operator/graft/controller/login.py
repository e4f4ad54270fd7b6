"""In-cluster login that honours KUBERNETES_SERVICE_HOST/PORT.

kopf's own service-account login always dials https://kubernetes.default.svc, which needs
cluster DNS. The kubelet gives every pod the API server's address in KUBERNETES_SERVICE_HOST
and KUBERNETES_SERVICE_PORT, and clusters without reachable service DNS (a single node whose
pods share the host network) set them explicitly; the official clients use them too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import kopf

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def api_server_url(env: Mapping[str, str]) -> str:
    host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
    if not host:
        return "https://kubernetes.default.svc"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"https://{host}:{port}"


def login_in_cluster(account: Path = SERVICE_ACCOUNT) -> kopf.ConnectionInfo | None:
    """Credentials of the pod's ServiceAccount, or None outside a pod."""
    token_path = account / "token"
    if not token_path.exists():
        return None
    namespace_path = account / "namespace"
    ca_path = account / "ca.crt"
    return kopf.ConnectionInfo(
        server=api_server_url(os.environ),
        ca_path=str(ca_path) if ca_path.exists() else None,
        token=token_path.read_text().strip(),
        scheme="Bearer",
        default_namespace=namespace_path.read_text().strip() if namespace_path.exists() else None,
    )
