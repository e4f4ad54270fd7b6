"""Prometheus metrics and the /metrics + /healthz endpoint (aiohttp, in the operator's loop)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "graft_reconcile_total",
            "Reconciles of Graft resources, by kind and result.",
            ["kind", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "graft_reconcile_duration_seconds",
            "Time one reconcile took.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.jobs_created = Counter(
            "graft_trainer_jobs_created_total",
            "Trainer Jobs the operator created.",
            ["kind"],
            registry=self.registry,
        )
        self.phases = Gauge(
            "graft_resources",
            "Graft resources by kind and phase, as last reconciled.",
            ["kind", "phase"],
            registry=self.registry,
        )
        self.api_requests = Counter(
            "graft_api_requests_total",
            "Kubernetes API requests the reconciler made, by method, resource and HTTP code.",
            ["method", "resource", "code"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "graft_workqueue_depth", "Keys queued or being reconciled.", registry=self.registry
        )
        self.tracked = Gauge(
            "graft_tracked_entries",
            "Entries the operator keeps per resource, by map (set at every resync): they follow "
            "the number of resources and fall when resources go.",
            ["map"],
            registry=self.registry,
        )
        self.stale_watches = Gauge(
            "graft_stale_watches",
            "Watches (resource and namespace) that owe a version the API server showed longer "
            "than GRAFT_WATCH_STALE_SECONDS ago; /healthz fails while any does.",
            registry=self.registry,
        )

    def count_api_response(self, method: str, resource: str, code: int) -> None:
        self.api_requests.labels(method, resource, str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve(
    metrics: Metrics,
    port: int,
    host: str = "0.0.0.0",
    problems: Callable[[], list[str]] = list,
) -> web.AppRunner:
    """/metrics, and /healthz: 200 "ok", or 503 with one line per `problems()` (dead watches)."""

    async def handle_metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(_: web.Request) -> web.Response:
        found = problems()
        if found:
            return web.Response(status=503, text="\n".join(found) + "\n")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
