"""One level-based reconcile of one FineTuneJob: read, plan (pure), act.

Owns the side effects: creating the spec ConfigMap, the trainer identity and the Job; deleting
the Job (suspend, terminal failure) and the resource (TTL); patching the operator-owned status
fields; posting an Event per transition. What to do is decided by `status.compute_status`;
what the children look like by `planner`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from datetime import UTC, datetime
from typing import Any

from graft.api.errors import FieldIssue
from graft.api.kinds import InvalidResource
from graft.controller import planner
from graft.controller.config import OperatorConfig
from graft.controller.kube import Kube, object_path, resource_path
from graft.controller.metrics import Metrics
from graft.controller.status import Event, Observed, compute_status, status_patch

logger = logging.getLogger("graft.controller")

# What the reconciler reads from the watch caches: kopf indexes keyed by (namespace, name).
Lookup = Callable[[tuple[str, str]], Iterable[dict[str, Any]]]


def _empty(_: tuple[str, str]) -> Iterable[dict[str, Any]]:
    return ()


class Caches:
    """Read access to the watched children (kopf indexes), filtered by owner."""

    def __init__(
        self, jobs: Lookup = _empty, pods: Lookup = _empty, configmaps: Lookup = _empty
    ) -> None:
        self.jobs, self.pods, self.configmaps = jobs, pods, configmaps

    @staticmethod
    def _owned(items: Iterable[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
        return [
            i
            for i in items
            if any(r.get("uid") == uid for r in i["metadata"].get("ownerReferences") or [])
        ]

    def job(self, key: tuple[str, str], uid: str) -> dict[str, Any] | None:
        owned = self._owned(self.jobs(key), uid)
        return owned[0] if owned else None

    def configmap(self, key: tuple[str, str], uid: str) -> dict[str, Any] | None:
        owned = self._owned(self.configmaps(key), uid)
        return owned[0] if owned else None

    def job_pods(self, key: tuple[str, str], job_uid: str) -> list[dict[str, Any]]:
        return sorted(
            self._owned(self.pods(key), job_uid),
            key=lambda p: str(p["metadata"].get("creationTimestamp") or ""),
        )


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        caches: Caches | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.kube = kube
        self.config = config
        self.caches = caches or Caches()
        self.metrics = metrics or Metrics()
        self._identities: dict[str, asyncio.Future[None]] = {}
        self._background: set[asyncio.Future[None]] = set()
        self.hints: dict[tuple[str, str], dict[str, Any]] = {}
        self._phases: dict[tuple[str, str], str] = {}

    async def __call__(self, key: Hashable) -> float | None:
        assert isinstance(key, tuple)
        started = time.perf_counter()
        result = "ok"
        try:
            return await self.reconcile((str(key[0]), str(key[1])))
        except Exception:
            result = "error"
            raise
        finally:
            self.metrics.reconciles.labels(planner.KIND, result).inc()
            self.metrics.latency.labels(planner.KIND).observe(time.perf_counter() - started)

    async def reconcile(self, key: tuple[str, str]) -> float | None:
        namespace, name = key
        # A resource seen for the first time (no status yet) is taken from its watch event:
        # nothing of ours can be newer, and it saves a round trip on the create path.
        obj = self.hints.pop(key, None) or await self.kube.get(resource_path(namespace, name))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self._set_phase(key, None)
            return None  # the garbage collector removes the Job, pods and ConfigMap
        uid = str(obj["metadata"]["uid"])

        resolved: planner.Resolved | None = None
        issues: tuple[FieldIssue, ...] = ()
        try:
            resolved = planner.resolve_spec(obj.get("spec"), self.config)
        except InvalidResource as exc:
            issues = tuple(exc.issues)

        configmap = self.caches.configmap(key, uid)
        job = self.caches.job(key, uid)
        pods = self.caches.job_pods(key, job["metadata"]["uid"]) if job else []
        launched_spec: dict[str, Any] | None = None
        launched_hash: str | None = None
        if configmap is not None:
            launched_spec, launched_hash = planner.launched_spec(configmap)
        if job is not None:
            launched_hash = (job["metadata"].get("annotations") or {}).get(
                planner.ANNOTATION_SPEC_HASH, launched_hash
            )
        effective = launched_spec or (resolved.spec if resolved else {})
        changed: tuple[str, ...] = ()
        if resolved and launched_spec and launched_hash != resolved.spec_hash:
            changed = tuple(planner.changed_fields(launched_spec, resolved.spec))
        observed = Observed(
            issues=issues,
            launched_hash=launched_hash,
            current_hash=resolved.spec_hash if resolved else None,
            changed=changed,
            job=job,
            pods=tuple(pods),
            backoff_limit=int(effective.get("backoffLimit", 2)),
            memory=(effective.get("resources") or {}).get("memory"),
        )
        plan = compute_status(obj, observed, datetime.now(UTC))

        requeue = plan.requeue_after
        if plan.create_job:
            created = await self._launch(obj, resolved, configmap, plan.status)
            if created is None:
                requeue = 1.0  # a previous incarnation's children are still being collected
        if plan.delete_job and job is not None:
            await self.kube.delete(object_path(job))
            plan.events.append(Event("Normal", "JobDeleted", f"deleted Job {job_name(job)}"))

        patch = status_patch(obj.get("status") or {}, plan.status)
        if plan.create_job and requeue is None:
            # Just launched: the Job's watch event brings this resource back for its status
            # patch. Under a burst, the queue's other launches go first.
            self._set_phase(key, str(plan.status.get("phase")))
            return 2.0
        if patch and not plan.delete_resource:
            await self.kube.merge_patch(
                resource_path(namespace, name, status=True), {"status": patch}
            )
        self._set_phase(key, str(plan.status.get("phase")))
        for event in plan.events:
            self._post(obj, event)
        if plan.delete_resource:
            await self.kube.delete(resource_path(namespace, name))
            self._set_phase(key, None)
            return None
        return requeue

    async def _launch(
        self,
        obj: dict[str, Any],
        resolved: planner.Resolved | None,
        configmap: dict[str, Any] | None,
        status: dict[str, Any],
    ) -> dict[str, Any] | None:
        namespace = obj["metadata"]["namespace"]
        uid = obj["metadata"]["uid"]
        await self._ensure_identity(namespace)
        attempts = int(status.get("attempts") or 0)
        if configmap is not None:  # launched before (resume): the frozen spec
            spec, spec_hash = planner.launched_spec(configmap)
            created = await self.kube.create(
                planner.build_trainer_job(
                    obj, spec, self.config, spec_hash_=spec_hash, attempts_before=attempts
                )
            )
        elif resolved is not None:  # first launch: ConfigMap and Job together
            wanted = planner.build_spec_configmap(obj, resolved)
            job = planner.build_trainer_job(
                obj, resolved.spec, self.config, spec_hash_=resolved.spec_hash
            )
            cm_created, created = await asyncio.gather(
                self.kube.create(wanted), self.kube.create(job)
            )
            if cm_created is None:  # exists: ours (cache lag) or an old incarnation's
                existing_cm = await self.kube.get(object_path(wanted))
                if existing_cm is None or not _owned_by(existing_cm, uid):
                    return None
        else:
            return None
        name = planner.job_name(obj["metadata"]["name"])
        if created is None:
            existing = await self.kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
            if existing is None or not _owned_by(existing, uid):
                return None
            created = existing
        else:
            self.metrics.jobs_created.labels(planner.KIND).inc()
            logger.info("created Job %s/%s", namespace, name)
            self._post(obj, Event("Normal", "JobCreated", f"created Job {name}"))
        status["jobName"] = name
        return created

    async def _ensure_identity(self, namespace: str) -> None:
        """ServiceAccount and RoleBinding for trainer pods, once per namespace and process."""
        task = self._identities.get(namespace)
        if task is None:
            task = asyncio.ensure_future(self._create_identity(namespace))
            self._identities[namespace] = task
        try:
            await asyncio.shield(task)
        except Exception:
            self._identities.pop(namespace, None)
            raise

    async def _create_identity(self, namespace: str) -> None:
        for manifest in planner.trainer_identity(namespace, self.config):
            await self.kube.create(manifest)  # 409: exists, fine

    def _post(self, obj: dict[str, Any], event: Event) -> None:
        """Post an Event in the background: best effort, never delays a reconcile."""
        task = asyncio.ensure_future(self._send(obj, event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, obj: dict[str, Any], event: Event) -> None:
        try:
            await self.kube.event(obj, event.type, event.reason, event.message)
        except Exception as exc:
            logger.warning("could not post event %s: %s", event.reason, exc)

    def _set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        old = self._phases.pop(key, None)
        if old is not None:
            self.metrics.phases.labels(planner.KIND, old).dec()
        if phase is not None:
            self._phases[key] = phase
            self.metrics.phases.labels(planner.KIND, phase).inc()

    async def resync(self, keys: Iterable[tuple[str, str]], enqueue: Callable[[Any], None]) -> None:
        for key in list(keys):
            enqueue(key)
            await asyncio.sleep(0)


def job_name(job: dict[str, Any]) -> str:
    return str(job["metadata"]["name"])


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])
