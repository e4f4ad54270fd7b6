"""A plain-HTTP reverse proxy in front of the local API server that can starve watches.

With `starve_watches()`, every watch request (`?watch=true`) gets its response headers and then
nothing more, and the streams already open stop passing events — a watch that is dead while the
API server answers every other request. `feed_watches()` closes the starved streams (kopf then
reconnects and resumes from its last version) and passes new ones through again.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.integration.operator_kit import free_port

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


class ApiProxy:
    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        self.config = config
        cluster = config["clusters"][0]["cluster"]
        self.upstream = str(cluster["server"]).rstrip("/")
        authority = cluster.get("certificate-authority-data")
        self.ssl = ssl.create_default_context(
            cafile=cluster.get("certificate-authority"),
            cadata=base64.b64decode(authority).decode() if authority else None,
        )
        self.port = free_port()
        self.starved = False
        self._released: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def kubeconfig(self, path: Path) -> Path:
        """A copy of the cluster's kubeconfig that reaches the API server through this proxy."""
        config = yaml.safe_load(yaml.safe_dump(self.config))
        config["clusters"][0]["cluster"] = {"server": f"http://127.0.0.1:{self.port}"}
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self) -> ApiProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the API proxy did not start")
        return self

    def __exit__(self, *_: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _stop(self) -> None:
        self._feed()
        await self._runner.cleanup()
        await self._session.close()

    def starve_watches(self) -> None:
        self._loop.call_soon_threadsafe(self._starve)

    def feed_watches(self) -> None:
        self._loop.call_soon_threadsafe(self._feed)

    def _starve(self) -> None:
        self.starved = True
        self._released = asyncio.Event()

    def _feed(self) -> None:
        self.starved = False
        if self._released is not None:
            self._released.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _hold(self) -> None:
        """Until the watches are fed again; then the stream ends."""
        released = self._released
        if released is not None:
            await released.wait()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("true", "1")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        response = web.StreamResponse()
        if watch and self.starved:
            response.content_type = "application/json"
            await response.prepare(request)
            await self._hold()
            return response
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
        ) as upstream:
            response.set_status(upstream.status, upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_HEADERS:
                    response.headers[key] = value
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                if watch and self.starved:
                    await self._hold()
                    break
                await response.write(chunk)
        return response
