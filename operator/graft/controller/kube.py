"""The one shared asynchronous Kubernetes client, speaking plain dicts.

Every operator API call goes through `Kube`: one aiohttp session, JSON in and out, 404 and 409
turned into answers rather than errors (idempotent creates and deletes). The credentials are
the ones kopf logs in with (`kopf.ConnectionInfo`: kubeconfig, or the pod's ServiceAccount).

No generated client library: kubernetes_asyncio's ~1,000 model classes cost the operator
~50 MiB of memory and ~2 s of start-up, and nothing here needs them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import kopf

from graft.api.base import GROUP, VERSION
from graft.api.kinds import KINDS_BY_NAME
from graft.controller.planner import KIND

COMPONENT = "graft-operator"
POOL_SIZE = 48


def resource_path(
    namespace: str, name: str | None = None, *, status: bool = False, kind: str = KIND
) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{KINDS_BY_NAME[kind].plural}"
    if name:
        path += f"/{name}"
        if status:
            path += "/status"
    return path


def object_path(obj: dict[str, Any], *, collection: bool = False) -> str:
    """The REST path of a (namespaced) object given as a manifest."""
    api_version = str(obj["apiVersion"])
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    plural = {
        "ConfigMap": "configmaps",
        "Job": "jobs",
        "ServiceAccount": "serviceaccounts",
        "Service": "services",
        "Pod": "pods",
        "Event": "events",
    }[str(obj["kind"])]
    path = f"{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}"
    return path if collection else f"{path}/{obj['metadata']['name']}"


class ApiError(Exception):
    """A refused API request: the HTTP status and the API server's reason."""

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        super().__init__(f"{status} {reason}: {body[:500]}")
        self.status, self.reason, self.body = status, reason, body

    @property
    def message(self) -> str:
        """The API server's own words (its Status object's message), else the HTTP reason."""
        try:
            text = json.loads(self.body).get("message")
        except (ValueError, AttributeError):
            text = None
        return str(text or self.reason)


def connection_info(kubeconfig: str | None = None) -> kopf.ConnectionInfo:
    """The credentials kopf would use: the kubeconfig (`kubeconfig`, KUBECONFIG or
    ~/.kube/config), else the pod's ServiceAccount."""
    from graft.controller.login import login_in_cluster

    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    info = None
    if os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists():
        info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    info = info or login_in_cluster()
    if info is None:
        raise RuntimeError("no Kubernetes credentials: set KUBECONFIG or run in a pod")
    return info


def _pem(data: str | bytes) -> bytes:
    """kubeconfig's *-data fields are base64 of PEM; accept PEM itself too."""
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def _base_dir() -> Path:
    first = (os.environ.get("KUBECONFIG") or "~/.kube/config").split(os.pathsep)[0]
    return Path(first).expanduser().parent


def _file(path: Any) -> str | None:
    """A kubeconfig path, relative ones taken from the kubeconfig's folder."""
    if not path:
        return None
    path = Path(os.fsdecode(path))
    return str(path if path.is_absolute() else _base_dir() / path)


def ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ca_data = _pem(info.ca_data).decode() if info.ca_data else None
    context = ssl.create_default_context(cafile=_file(info.ca_path), cadata=ca_data)
    cert, key = _file(info.certificate_path), _file(info.private_key_path)
    if info.certificate_data or info.private_key_data:
        # ssl loads client certificates from files only; these live as long as the process.
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as fh:
            fh.write(_pem(info.certificate_data or b""))
            fh.write(b"\n" + _pem(info.private_key_data or b""))
        cert = key = fh.name
    if cert:
        context.load_cert_chain(cert, key)
    return context


def resource_of(path: str) -> str:
    """The resource (and subresource) a REST path addresses: `jobs`, `finetunejobs/status`."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2 :]
    else:
        rest = parts[2:] if parts[0] == "api" else parts[3:]
    return rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "") if rest else "?"


# Called after every API response with (method, resource, HTTP status).
ResponseHook = Callable[[str, str, int], None]
# Called with every object a successful API response returns (not lists).
ObjectHook = Callable[[dict[str, Any]], None]
# How often the pod's ServiceAccount token file is read again: the kubelet rotates bound tokens
# (they expire after an hour, with a grace period) well before they run out.
TOKEN_REREAD_SECONDS = 60.0


class TokenFile:
    """A bearer token read from a file the kubelet rewrites as it rotates the token: read again
    every TOKEN_REREAD_SECONDS, and at once when the API server answers 401."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._token = ""
        self._read_at = -float("inf")

    def current(self, *, fresh: bool = False) -> str:
        now = time.monotonic()
        if fresh or now - self._read_at >= TOKEN_REREAD_SECONDS:
            with contextlib.suppress(OSError):
                self._token = self.path.read_text().strip()
            self._read_at = now
        return self._token


class Kube:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: str,
        on_response: ResponseHook | None = None,
        token_file: TokenFile | None = None,
        on_object: ObjectHook | None = None,
    ) -> None:
        self.session = session
        self.server = server.rstrip("/")
        self.instance = os.environ.get("HOSTNAME", "graft-operator")
        self.on_response = on_response
        self.token_file = token_file
        self.on_object = on_object

    @classmethod
    async def connect(
        cls,
        kubeconfig: str | None = None,
        on_response: ResponseHook | None = None,
        on_object: ObjectHook | None = None,
    ) -> Kube:
        from graft.controller.login import SERVICE_ACCOUNT

        info = connection_info(kubeconfig)
        headers = {"Accept": "application/json", "User-Agent": "graft-operator"}
        auth = None
        token_file = None
        # The same choice as connection_info: without a kubeconfig, the pod's ServiceAccount.
        kubeconfig_used = bool(os.environ.get("KUBECONFIG")) or (
            Path("~/.kube/config").expanduser().exists()
        )
        if not kubeconfig_used and info.token and (SERVICE_ACCOUNT / "token").exists():
            token_file = TokenFile(SERVICE_ACCOUNT / "token")  # rotated by the kubelet
        elif info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            auth = aiohttp.BasicAuth(info.username, info.password)
        session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            # Connections are kept open for minutes: 40 creates at once on 40 new TLS
            # connections took 5x as long as on open ones (handshakes on both sides of two
            # shared cores). 48 of them, against 16, cut a 200-resource burst's create -> Job
            # p95 from 2.3-3.2 s to 1.5-1.9 s and the operator's CPU for it by a third
            # (bench/README.md, operator latency).
            connector=aiohttp.TCPConnector(
                ssl=ssl_context(info), limit=POOL_SIZE, keepalive_timeout=300
            ),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        return cls(session, str(info.server), on_response, token_file, on_object)

    async def close(self) -> None:
        await self.session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
        accept: str | None = None,
    ) -> dict[str, Any]:
        text = await self._exchange(method, path, body, content_type, query, accept)
        result = json.loads(text) if text else {}
        assert isinstance(result, dict)
        if self.on_object is not None and "metadata" in result and "items" not in result:
            self.on_object(result)
        return result

    async def _exchange(
        self,
        method: str,
        path: str,
        body: Any,
        content_type: str,
        query: list[tuple[str, str]] | None,
        accept: str | None,
    ) -> bytes:
        """One request's response body; an ApiError for a status of 400 or more."""
        data = json.dumps(body).encode() if body is not None else None
        for fresh in (False, True):
            headers = {"Content-Type": content_type}
            if accept:
                headers["Accept"] = accept
            if self.token_file is not None:
                headers["Authorization"] = f"Bearer {self.token_file.current(fresh=fresh)}"
            async with self.session.request(
                method, self.server + path, data=data, params=query or None, headers=headers
            ) as response:
                text = await response.read()
                status, reason = response.status, response.reason or ""
            if self.on_response is not None:
                self.on_response(method, resource_of(path), status)
            if status == 401 and self.token_file is not None and not fresh:
                continue  # the token rotated under us: read it again and retry once
            if status >= 400:
                raise ApiError(status, reason, text.decode(errors="replace"))
            break
        return text

    async def read_log(self, namespace: str, pod: str, container: str, lines: int) -> str | None:
        """The last `lines` lines of a container's log; None when the pod is gone."""
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        query = [("container", container), ("tailLines", str(lines))]
        try:
            text = await self._exchange("GET", path, None, "application/json", query, None)
        except ApiError as exc:
            if exc.status in (400, 404):  # gone, or not started yet
                return None
            raise
        return text.decode(errors="replace")

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create; None when it already exists (409), which callers treat as done."""
        try:
            return await self.request("POST", object_path(obj, collection=True), obj)
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def delete(self, path: str, *, propagation: str = "Background") -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            await self.request("DELETE", path, body)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    async def list_metadata(self, path: str, selector: str | None = None) -> list[dict[str, Any]]:
        """Names, labels and resourceVersions of a collection, from the API server's watch cache
        (resourceVersion=0): a few hundred bytes per object, whatever its size."""
        query = [("resourceVersion", "0")] + ([("labelSelector", selector)] if selector else [])
        listing = await self.request(
            "GET",
            path,
            query=query,
            accept="application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        return [dict(i) for i in listing.get("items") or []]

    async def list(
        self, path: str, selector: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", selector)] if selector else []
        query += [("fieldSelector", fields)] if fields else []
        items = (await self.request("GET", path, query=query or None)).get("items") or []
        return [dict(i) for i in items]

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": obj.get("kind") or KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": f"{GROUP}/operator",
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
