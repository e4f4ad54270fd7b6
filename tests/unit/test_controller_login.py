from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from graft.controller.kube import ApiError
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


def _self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "graft-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def test_kube_client_takes_kopfs_credentials_from_a_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's own client: CA and client certificate as base64 data or relative paths
    (relative to the kubeconfig), a bearer token, or TLS verification switched off."""
    import asyncio
    import base64

    import yaml

    from graft.controller.kube import Kube, connection_info, ssl_context

    cert, key = _self_signed(tmp_path)
    (tmp_path / "ca.crt").write_bytes(cert)
    config = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [
            {
                "name": "k",
                "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority": "ca.crt"},
            }
        ],
        "users": [
            {
                "name": "u",
                "user": {
                    "client-certificate-data": base64.b64encode(cert).decode(),
                    "client-key-data": base64.b64encode(key).decode(),
                },
            }
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    info = connection_info(str(path))
    assert info.server == "https://127.0.0.1:6443"
    context = ssl_context(info)
    assert isinstance(context, ssl.SSLContext)
    assert context.cert_store_stats()["x509_ca"] == 1  # the CA from the relative path

    config["clusters"][0]["cluster"] = {
        "server": "https://127.0.0.1:6443/",
        "insecure-skip-tls-verify": True,
    }
    config["users"][0]["user"] = {"token": "s3cr3t"}
    path.write_text(yaml.safe_dump(config))
    info = connection_info(str(path))
    assert ssl_context(info) is False

    async def headers() -> tuple[str, str]:
        kube = await Kube.connect(str(path))
        try:
            return kube.server, kube.session.headers["Authorization"]
        finally:
            await kube.close()

    assert asyncio.run(headers()) == ("https://127.0.0.1:6443", "Bearer s3cr3t")


def test_a_rotated_service_account_token_is_read_again(tmp_path: Path) -> None:
    """The kubelet rewrites the projected token as it rotates it (bound tokens expire): the
    operator's client reads the file again, at once when the API server answers 401."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from graft.controller.kube import Kube, TokenFile

    token_path = tmp_path / "token"
    token_path.write_text("first\n")
    accepted = {"token": "first"}
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization", "")
        seen.append(sent)
        if sent != f"Bearer {accepted['token']}":
            return web.json_response({"kind": "Status", "message": "Unauthorized"}, status=401)
        return web.json_response({"kind": "Namespace", "metadata": {"name": "team-a"}})

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/team-a", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        kube = Kube(
            aiohttp.ClientSession(), f"http://127.0.0.1:{port}", token_file=TokenFile(token_path)
        )
        try:
            assert (await kube.get("/api/v1/namespaces/team-a"))["metadata"]["name"] == "team-a"
            # rotated: the old token is refused from now on, the file holds the new one
            accepted["token"] = "second"
            token_path.write_text("second\n")
            assert await kube.get("/api/v1/namespaces/team-a") is not None
            assert seen == ["Bearer first", "Bearer first", "Bearer second"]
            # a token that is simply wrong still fails, after one fresh read
            accepted["token"] = "third"
            with pytest.raises(ApiError) as refused:
                await kube.get("/api/v1/namespaces/team-a")
            assert refused.value.status == 401 and seen[-2:] == ["Bearer second"] * 2
        finally:
            await kube.close()
            await runner.cleanup()

    asyncio.run(scenario())
