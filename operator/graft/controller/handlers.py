"""kopf wiring: watches feed the work queue; indexes are the read caches. No logic here.

Every watched object only names the resource to reconcile, as (kind, namespace, name): a Graft
resource itself, or the `graft.dev/kind` and `graft.dev/name` labels of its Job, pods and spec
ConfigMap. A FineTuneJob's events also wake the resources waiting on it. The reconcile is level-based, so
missing or repeated events cost nothing but a pass. No handler here keeps progress or a diff
base, so kopf puts no finalizer and no annotation on the resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from graft.api.base import GROUP, VERSION
from graft.api.kinds import KINDS_BY_NAME
from graft.controller import planner
from graft.controller.config import OperatorConfig
from graft.controller.kube import Kube
from graft.controller.metrics import Metrics, serve
from graft.controller.reconciler import Caches, Reconciler
from graft.controller.watch_health import WatchHealth
from graft.controller.workqueue import WorkQueue

logger = logging.getLogger("graft.controller")

CHILD_LABELS: dict[str, Any] = {
    planner.LABEL_KIND: kopf.PRESENT,
    planner.LABEL_NAME: kopf.PRESENT,
}
# The same, as the server-side label selector of the children's watches.
CHILD_SELECTOR = f"{planner.LABEL_KIND},{planner.LABEL_NAME}"
CHILD_RESOURCES = (("batch", "v1", "jobs"), ("v1", "pods"), ("v1", "configmaps"))
CHILD_KINDS = {"Job": "jobs", "Pod": "pods", "ConfigMap": "configmaps"}


def plain(value: Any) -> Any:
    """A kopf body (or any mapping view) as plain, independent dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _slim(body: Mapping[str, Any], keep_data: bool = False) -> Any:
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "metadata": {
            k: plain(meta[k])
            for k in (
                "name",
                "namespace",
                "uid",
                "labels",
                "annotations",
                "ownerReferences",
                "creationTimestamp",
                "deletionTimestamp",
            )
            if k in meta
        },
        "status": plain(body.get("status") or {}),
    }
    for key in ("apiVersion", "kind"):
        if key in body:
            out[key] = body[key]
    if keep_data:
        out["data"] = plain(body.get("data") or {})
    return out


def _lookup(index: Any) -> Any:
    def lookup(key: tuple[str, str]) -> Iterable[dict[str, Any]]:
        store = index.get(key) if index is not None else None
        return list(store) if store is not None else []

    return lookup


def _namespace_lookup(index: Any) -> Any:
    """Every item of a (namespace, name)-keyed index in one namespace."""

    def lookup(namespace: str) -> Iterable[dict[str, Any]]:
        if index is None:
            return []
        return [item for key, store in list(index.items()) if key[0] == namespace for item in store]

    return lookup


class Runtime:
    """Everything one operator process shares: config, client, queue, caches, metrics."""

    def __init__(self, config: OperatorConfig, kubeconfig: str | None = None) -> None:
        self.config = config
        self.kubeconfig = kubeconfig
        self.metrics = Metrics()
        self.caches = Caches()
        self.kube: Kube | None = None
        self.queue: WorkQueue | None = None
        self.reconciler: Reconciler | None = None
        self.resources: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._server: Any = None
        self.watch_health = WatchHealth(
            {**CHILD_KINDS, **{k: KINDS_BY_NAME[k].plural for k in planner.KINDS}},
            children=CHILD_KINDS,
            child_labels=CHILD_LABELS,
            stale_after=config.watch_stale_seconds,
        )
        self._stale: list[str] = []

    def enqueue(
        self, kind: str | None, namespace: str | None, name: str | None, *, urgent: bool = False
    ) -> None:
        if self.queue is None or kind not in planner.KINDS or not namespace or not name:
            return
        self.queue.add((kind, namespace, name), urgent=urgent)
        if kind == planner.KIND and self.reconciler is not None:
            for key in self.reconciler.dependents_of(namespace, name):
                self.queue.add(key)

    async def start(self, indices: Mapping[str, Any]) -> None:
        self.caches.jobs = _lookup(indices.get("graft_jobs"))
        self.caches.pods = _lookup(indices.get("graft_pods"))
        self.caches.configmaps = _lookup(indices.get("graft_configmaps"))
        self.caches.namespace_jobs = _namespace_lookup(indices.get("graft_jobs"))
        self.resources = [indices.get(f"graft_resources_{k.lower()}") for k in planner.KINDS]
        self.kube = await Kube.connect(
            self.kubeconfig, self.metrics.count_api_response, self.watch_health.seen_in_api
        )
        self.reconciler = Reconciler(self.kube, self.config, self.caches, self.metrics)
        self.queue = WorkQueue(self.reconciler, workers=self.config.workers)
        self.reconciler.busy = lambda: bool(self.queue and self.queue.urgent_pending())
        self.queue.start()
        self._tasks.append(asyncio.create_task(self._resync()))
        if self.config.metrics_port:
            self._server = await serve(
                self.metrics,
                self.config.metrics_port,
                self.config.metrics_host,
                problems=self.stale_watches,
            )

    async def _resync(self) -> None:
        """Every resource is reconciled periodically, events or not."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            if self.queue is None:
                continue
            for index in self.resources or []:
                for key in list(index.keys()) if index is not None else []:
                    self.queue.add(key)
            self.metrics.queue_depth.set(len(self.queue))
            if self.reconciler is not None:
                sizes = {**self.reconciler.state_sizes(), **self.queue.state_sizes()}
                for name, size in sizes.items():
                    self.metrics.tracked.labels(name).set(size)
            await self._audit_watches()
            self.stale_watches()

    async def _audit_watches(self) -> None:
        """What the watches owe, read from the API server: the versions of every watched object
        (metadata only), so a watch that stopped delivering shows even where the operator writes
        nothing (see watch_health)."""
        if self.kube is None:
            return
        streams = [
            (kind, f"/api/v1/{plural}" if kind != "Job" else f"/apis/batch/v1/{plural}", True)
            for kind, plural in CHILD_KINDS.items()
        ] + [
            (kind, f"/apis/{GROUP}/{VERSION}/{KINDS_BY_NAME[kind].plural}", False)
            for kind in planner.KINDS
        ]
        for namespace in self.config.watch_namespaces or ("",):
            for kind, path, child in streams:
                if namespace:
                    head, plural = path.rsplit("/", 1)
                    path = f"{head}/namespaces/{namespace}/{plural}"
                try:
                    items = await self.kube.list_metadata(path, CHILD_SELECTOR if child else None)
                except Exception as exc:  # an outage: the watches are judged on the next pass
                    logger.debug("watch audit of %s failed: %s", path, exc)
                    continue
                for item in items:
                    self.watch_health.seen_in_api({**item, "kind": kind})

    def stale_watches(self) -> list[str]:
        """The watches that stopped delivering (see watch_health), logged when the verdict
        changes and counted in a gauge."""
        stale = self.watch_health.stale()
        self.metrics.stale_watches.set(len(stale))
        if stale != self._stale and stale:
            logger.error("watches stopped delivering; /healthz fails: %s", "; ".join(stale))
        elif self._stale and not stale:
            logger.info("the watches deliver again")
        self._stale = stale
        return stale

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.queue is not None:
            await self.queue.stop()
        if self.reconciler is not None:
            await self.reconciler.flush_events()
        if self._server is not None:
            await self._server.cleanup()
        if self.kube is not None:
            await self.kube.close()


def register(runtime: Runtime, registry: kopf.OperatorRegistry) -> None:
    """Register the watches and caches of `runtime` in a kopf registry."""

    @kopf.on.startup(registry=registry, id="graft_startup")
    async def graft_startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        configure_settings(settings)
        indices = {k: kwargs[k] for k in kwargs if k.startswith("graft_")}
        await runtime.start(indices)

    @kopf.on.cleanup(registry=registry, id="graft_cleanup")
    async def graft_cleanup(**_: Any) -> None:
        await runtime.stop()

    # All handlers are coroutines: kopf would run plain functions in a thread pool.
    # Caches. kopf runs no handler until every index has its initial listing, so the first
    # reconciles after a restart already see every existing Job and pod.
    for kind in planner.KINDS:
        _register_kind(runtime, registry, kind)

    @kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS, registry=registry, id="graft_jobs")
    async def graft_jobs(**kw: Any) -> Any:
        return {(kw["namespace"], kw["labels"][planner.LABEL_NAME]): _slim(kw["body"])}

    @kopf.index("v1", "pods", labels=CHILD_LABELS, registry=registry, id="graft_pods")
    async def graft_pods(**kw: Any) -> Any:
        return {(kw["namespace"], kw["labels"][planner.LABEL_NAME]): _slim(kw["body"])}

    @kopf.index("v1", "configmaps", labels=CHILD_LABELS, registry=registry, id="graft_configmaps")
    async def graft_configmaps(**kw: Any) -> Any:
        runtime.watch_health.delivered(kw["body"])
        key = (kw["namespace"], kw["labels"][planner.LABEL_NAME])
        return {key: _slim(kw["body"], keep_data=True)}

    # Triggers: any change of a child reconciles its resource.
    @kopf.on.event(
        "batch", "v1", "jobs", labels=CHILD_LABELS, registry=registry, id="graft_job_event"
    )
    async def graft_job_event(**kw: Any) -> None:
        runtime.watch_health.delivered(kw["body"])
        labels = kw["labels"]
        runtime.enqueue(
            labels.get(planner.LABEL_KIND), kw["namespace"], labels.get(planner.LABEL_NAME)
        )

    @kopf.on.event("v1", "pods", labels=CHILD_LABELS, registry=registry, id="graft_pod_event")
    async def graft_pod_event(**kw: Any) -> None:
        runtime.watch_health.delivered(kw["body"])
        labels = kw["labels"]
        runtime.enqueue(
            labels.get(planner.LABEL_KIND), kw["namespace"], labels.get(planner.LABEL_NAME)
        )


def _register_kind(runtime: Runtime, registry: kopf.OperatorRegistry, kind: str) -> None:
    """The resource index (for resyncs) and the resource's own trigger, for one kind."""
    resource = (GROUP, VERSION, KINDS_BY_NAME[kind].plural)
    suffix = kind.lower()

    @kopf.index(*resource, registry=registry, id=f"graft_resources_{suffix}")
    async def graft_resources(**kw: Any) -> Any:
        return {(kind, kw["namespace"], kw["name"]): None}

    # Any change of the resource reconciles it.
    @kopf.on.event(*resource, registry=registry, id=f"graft_resource_event_{suffix}")
    async def graft_resource_event(**kw: Any) -> None:
        body = kw["body"]
        runtime.watch_health.delivered(body)
        gone = kw.get("type") == "DELETED"
        if runtime.reconciler is not None:
            runtime.reconciler.observe(
                (kind, kw["namespace"], kw["name"]), None if gone else plain(body)
            )
        # Never reconciled yet (no status): a launch, which goes before status passes.
        fresh = (
            not gone and not body.get("status") and not body["metadata"].get("deletionTimestamp")
        )
        runtime.enqueue(kind, kw["namespace"], kw["name"], urgent=fresh)


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps no diff base. Only `on.event` and `index` handlers are registered, and nothing here
    reads a diff, yet kopf builds the base (a deep copy of the body) on every watch event: under
    a burst of 200 FineTuneJobs that was about a third of kopf's processing time."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return kopf.BodyEssence()

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """kopf settings chosen on purpose (see docs/operator.md)."""
    # Our own prefixes, should kopf ever store anything (no handler here needs it).
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    # Watches: server-side timeout below typical load-balancer idle timeouts, a client-side
    # timeout a little above it, and kopf's inactivity timeout for silent streams.
    settings.watching.server_timeout = 240
    settings.watching.client_timeout = 270
    settings.watching.connect_timeout = 30
    settings.watching.reconnect_backoff = 1.0
    # Bounded retries of failed API calls inside kopf.
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    # Jobs, pods and ConfigMaps: only Graft's children, selected by the API server, not every
    # object of the served namespaces sent over the watch and dropped here.
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = CHILD_SELECTOR
    # We post our own Events (one per condition transition); kopf's log-as-event posting off.
    settings.posting.enabled = False
    settings.queueing.idle_timeout = 30.0
