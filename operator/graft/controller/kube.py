"""The one shared asynchronous Kubernetes client, speaking plain dicts.

Every operator API call goes through `Kube`: one aiohttp session (kubernetes_asyncio), JSON in
and out, 404 and 409 turned into answers rather than errors (idempotent creates and deletes).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from graft.api.base import GROUP, VERSION
from graft.api.kinds import KINDS_BY_NAME
from graft.controller.planner import KIND

COMPONENT = "graft-operator"


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
        "Role": "roles",
        "RoleBinding": "rolebindings",
        "Pod": "pods",
        "Event": "events",
    }[str(obj["kind"])]
    path = f"{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}"
    return path if collection else f"{path}/{obj['metadata']['name']}"


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.instance = os.environ.get("HOSTNAME", "graft-operator")

    @classmethod
    async def connect(cls, kubeconfig: str | None = None) -> Kube:
        cfg = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG")
        if path:
            await config.load_kube_config(config_file=path, client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        return cls(client.ApiClient(configuration=cfg))

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        response = await self.api.call_api(
            path,
            method,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=30,
        )
        try:
            data = await response.read()
        finally:
            response.release()
        if response.status >= 400:
            error = ApiException(status=response.status, reason=response.reason)
            error.body = data.decode(errors="replace")
            raise error
        result = json.loads(data) if data else {}
        assert isinstance(result, dict)
        return result

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create; None when it already exists (409), which callers treat as done."""
        try:
            return await self.request("POST", object_path(obj, collection=True), obj)
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    async def delete(self, path: str, *, propagation: str = "Background") -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            await self.request("DELETE", path, body)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    async def list(self, path: str, selector: str | None = None) -> list[dict[str, Any]]:
        query = [("labelSelector", selector)] if selector else None
        items = (await self.request("GET", path, query=query)).get("items") or []
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
