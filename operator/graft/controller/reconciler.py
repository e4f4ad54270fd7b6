"""One level-based reconcile of one Graft resource (any kind): read, plan (pure), act.

Owns the side effects: creating the spec ConfigMap, the trainer identity and the Job; deleting
the Job (suspend, terminal failure) and the resource (TTL); patching the operator-owned status
fields; posting an Event per transition. What to do is decided by `status.compute_status`;
what the children look like by `planner`; whether referenced FineTuneJobs allow a launch by
`sources.gate`.

Keys are (kind, namespace, name).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from datetime import UTC, datetime
from typing import Any

import aiohttp

from graft.api.base import DEFAULT_BACKOFF_LIMIT
from graft.api.errors import FieldIssue
from graft.api.kinds import InvalidResource
from graft.controller import gang, planner, sources
from graft.controller.conditions import true_condition
from graft.controller.config import OperatorConfig
from graft.controller.kube import ApiError, Kube, object_path, resource_path
from graft.controller.metrics import Metrics
from graft.controller.progress_log import TAIL_LINES, latest_progress
from graft.controller.status import (
    LAUNCH_RETRY,
    Event,
    Observed,
    Plan,
    PreflightObserved,
    StudyObserved,
    compute_status,
    job_finished,
    launch_refused,
    parse_time,
    status_patch,
)
from graft.controller.study import FINISHED, TrialObserved, observe_trial
from graft.naming import artifact_prefix
from graft.policy import gpu_budget, namespace_gpu_budget

logger = logging.getLogger("graft.controller")

# What the reconciler reads from the watch caches: kopf indexes keyed by (namespace, name).
Lookup = Callable[[tuple[str, str]], Iterable[dict[str, Any]]]
Key = tuple[str, str, str]  # (kind, namespace, name)

EVENT_DELAY_MAX = 5.0
# Refusals of a create that a retry in a second will not change: bad request, forbidden (a
# quota, RBAC, an admission webhook), invalid. Shown on the resource as LaunchRefused.
REFUSED = frozenset({400, 403, 422})
# A Job whose controller made no pod this long after its creation: its Events say why.
POD_REFUSAL_GRACE = 20.0
IDENTITY_TTL = 300.0  # seconds before a namespace's trainer identity is ensured again
CLAIM_TTL = 120.0  # seconds a created Job counts against the GPU budget before the cache shows it


def _empty(_: tuple[str, str]) -> Iterable[dict[str, Any]]:
    return ()


class Caches:
    """Read access to the watched children (kopf indexes), filtered by owner."""

    def __init__(
        self,
        jobs: Lookup = _empty,
        pods: Lookup = _empty,
        configmaps: Lookup = _empty,
        namespace_jobs: Callable[[str], Iterable[dict[str, Any]]] = lambda _: (),
    ) -> None:
        self.jobs, self.pods, self.configmaps = jobs, pods, configmaps
        self.namespace_jobs = namespace_jobs  # every Graft Job of one namespace

    @staticmethod
    def _owned(items: Iterable[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
        return [
            i
            for i in items
            if any(r.get("uid") == uid for r in i["metadata"].get("ownerReferences") or [])
        ]

    def job(self, key: tuple[str, str], uid: str) -> dict[str, Any] | None:
        """The trainer Job (a multi-node job's Indexed Job, or its node 0's Job)."""
        owned = [
            j
            for j in self._owned(self.jobs(key), uid)
            if _trial_of(j) is None and not _is_preflight(j) and not gang.node_of(j)
        ]
        return owned[0] if owned else None

    def node_jobs(self, key: tuple[str, str], uid: str) -> list[dict[str, Any]]:
        """A multi-node job's per-node Jobs of nodes 1..n-1, by node."""
        found = [j for j in self._owned(self.jobs(key), uid) if gang.node_of(j)]
        return sorted(found, key=lambda j: gang.node_of(j) or 0)

    def preflight_job(self, key: tuple[str, str], uid: str) -> dict[str, Any] | None:
        owned = [j for j in self._owned(self.jobs(key), uid) if _is_preflight(j)]
        return owned[0] if owned else None

    def trial_jobs(self, key: tuple[str, str], uid: str) -> dict[int, dict[str, Any]]:
        """A searched FineTuneJob's trial Jobs by trial number."""
        found: dict[int, dict[str, Any]] = {}
        for job in self._owned(self.jobs(key), uid):
            number = _trial_of(job)
            if number is not None:
                found[number] = job
        return found

    def configmap(self, key: tuple[str, str], uid: str) -> dict[str, Any] | None:
        owned = self._owned(self.configmaps(key), uid)
        return owned[0] if owned else None

    def job_pods(self, key: tuple[str, str], job_uid: str) -> list[dict[str, Any]]:
        return sorted(
            self._owned(self.pods(key), job_uid),
            key=lambda p: str(p["metadata"].get("creationTimestamp") or ""),
        )


@dataclasses.dataclass(frozen=True)
class Children:
    """What one pass sees of a resource before planning: its validated spec (or the issues),
    its children, the launched spec, and the referenced FineTuneJobs' gate."""

    resolved: planner.Resolved | None
    issues: tuple[FieldIssue, ...]
    configmap: dict[str, Any] | None  # the spec ConfigMap of the launch, if any
    job: dict[str, Any] | None
    pods: list[dict[str, Any]]  # the Job's, oldest first (a gang's: node 0's first)
    gate: sources.SourceGate | None  # before a launch: the referenced FineTuneJobs
    launched_spec: dict[str, Any] | None
    launched_hash: str | None
    effective: dict[str, Any]  # the launched spec, else the current one
    study: StudyObserved | None
    preflight: PreflightObserved | None
    node_jobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)


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
        self._identities: dict[str, tuple[asyncio.Future[None], float]] = {}
        # Events wait while launches are pending (`busy`), at most EVENT_DELAY_MAX seconds:
        # under a burst the API server's writes go to the Jobs first.
        self.busy: Callable[[], bool] = lambda: False
        self._events: deque[tuple[float, dict[str, Any], Event]] = deque()
        self._poster: asyncio.Future[None] | None = None
        self._resolved: dict[
            Key,
            tuple[tuple[str, Any], planner.Resolved | None, tuple[FieldIssue, ...]],
        ] = {}
        # The newest body of each resource: from its watch events and our own status patches'
        # responses. Read instead of a GET on every pass (which, under a burst, tripled the
        # API requests per resource).
        self.bodies: dict[Key, dict[str, Any]] = {}
        self._phases: dict[Key, str] = {}
        # resource -> (its Job's uid, pods counted before this process saw the Job, pod uids
        # seen since): a pod deleted outright still counts as an attempt.
        self._pods_seen: dict[Key, tuple[str, int, set[str]]] = {}
        # (namespace, FineTuneJob name) -> resources waiting on it; its events wake them.
        self.dependents: dict[tuple[str, str], set[Key]] = {}
        self._budget_locks: dict[str, asyncio.Lock] = {}
        # Jobs this process created that the watch cache may not show yet:
        # namespace -> {Job name: (GPUs, when created)}.
        self._gpu_claims: dict[str, dict[str, tuple[int, float]]] = {}
        self._indexed: bool | None = None  # the API server runs Indexed Jobs (asked once)
        # resource -> (when its trainer pod's log was last read, the newest progress found).
        self._progress: dict[Key, tuple[float, dict[str, Any] | None]] = {}

    def state_sizes(self) -> dict[str, int]:
        """Entries of each per-resource map: a resource gone must leave none behind."""
        return {
            "resolved": len(self._resolved),
            "bodies": len(self.bodies),
            "phases": len(self._phases),
            "pods_seen": len(self._pods_seen),
            "dependents": sum(len(v) for v in self.dependents.values()),
            "gpu_claims": sum(len(v) for v in self._gpu_claims.values()),
            "progress": len(self._progress),
        }

    async def __call__(self, key: Hashable) -> float | None:
        assert isinstance(key, tuple)
        started = time.perf_counter()
        result = "ok"
        kind = str(key[0])
        resource_key: Key = (kind, str(key[1]), str(key[2]))
        try:
            return await self.reconcile(resource_key)
        except ApiError as exc:
            if exc.status == 404 and self.bodies.pop(resource_key, None) is not None:
                # Acted on a remembered body of a resource that is gone (its DELETED event
                # lost across a watch reconnect): read it again now.
                result = "stale"
                return 0.0
            result = "error"
            raise
        except Exception:
            result = "error"
            raise
        finally:
            self.metrics.reconciles.labels(kind, result).inc()
            self.metrics.latency.labels(kind).observe(time.perf_counter() - started)

    async def reconcile(self, key: Key) -> float | None:
        """Read the resource and its children, plan (pure), launch or delete children, and
        write the status; the seconds until the resource is looked at again (None: when an
        event says so)."""
        obj = await self._body(key)
        if obj is None:
            return None  # the garbage collector removes the Job, pods and ConfigMap
        seen = await self._children(key, obj)
        budget_lock = await self._budget_lock(key[1], seen)
        try:
            plan, observed, requeue = await self._plan_and_launch(
                key, obj, seen, budget=budget_lock is not None
            )
        finally:
            if budget_lock is not None:
                budget_lock.release()
        await self._delete_children(plan, seen, observed.backoff_limit)
        return await self._write_status(key, obj, plan, seen, requeue)

    async def _body(self, key: Key) -> dict[str, Any] | None:
        """The resource (the remembered body, else a GET); None, with what is kept about it
        forgotten, when it is gone or being deleted."""
        kind, namespace, name = key
        cached = self.bodies.get(key)
        obj = dict(cached) if cached is not None else None
        if obj is None:
            obj = await self.kube.get(resource_path(namespace, name, kind=kind))
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self._set_phase(key, None)
            self._forget_dependencies(key)
            self._pods_seen.pop(key, None)
            self._resolved.pop(key, None)
            self._progress.pop(key, None)
            return None
        obj.setdefault("kind", kind)
        return obj

    async def _children(self, key: Key, obj: dict[str, Any]) -> Children:
        """The validated spec and what the caches (and, before a launch, the referenced
        FineTuneJobs) show of the resource's children."""
        _, namespace, name = key
        uid = str(obj["metadata"]["uid"])
        cache_key = (namespace, name)
        resolved, issues = self._resolve(key, obj)
        configmap = self.caches.configmap(cache_key, uid)
        job = self.caches.job(cache_key, uid)
        pods = self.caches.job_pods(cache_key, job["metadata"]["uid"]) if job else []
        node_jobs = self.caches.node_jobs(cache_key, uid)
        for node_job in node_jobs:
            pods += self.caches.job_pods(cache_key, node_job["metadata"]["uid"])
        # A gang's pods: node 0's first (its outcome is the job's); otherwise (stable) as made.
        pods.sort(key=lambda p: gang.node_of(p) or 0)
        if configmap is not None and job is None and not _ever_launched(obj):
            # The spec ConfigMap of a launch whose Job the API server refused: nothing ran, so
            # the current spec launches (the ConfigMap is brought up to date first).
            configmap = None
        gate: sources.SourceGate | None = None
        if resolved is not None and configmap is None and job is None:
            gate = await self._source_gate(key, resolved)
        launched_spec: dict[str, Any] | None = None
        launched_hash: str | None = None
        if configmap is not None:
            launched_spec, launched_hash = planner.launched_spec(configmap)
        if job is not None:
            launched_hash = (job["metadata"].get("annotations") or {}).get(
                planner.ANNOTATION_SPEC_HASH, launched_hash
            )
        effective = launched_spec or (resolved.spec if resolved else {})
        study = self._observe_study(key, uid, effective)
        if study is not None and study.trials and launched_hash is None:
            launched_hash = (study.trials[0].job["metadata"].get("annotations") or {}).get(
                planner.ANNOTATION_SPEC_HASH
            )
        preflight: PreflightObserved | None = None
        if (
            resolved is not None
            and configmap is None
            and job is None
            and not (study is not None and study.trials)
        ):
            preflight = self._observe_preflight(key, uid, resolved)
        return Children(
            resolved=resolved,
            issues=issues,
            configmap=configmap,
            job=job,
            pods=pods,
            gate=gate,
            launched_spec=launched_spec,
            launched_hash=launched_hash,
            effective=effective,
            study=study,
            preflight=preflight,
            node_jobs=node_jobs,
        )

    def _observe_study(self, key: Key, uid: str, effective: dict[str, Any]) -> StudyObserved | None:
        """A searched FineTuneJob's trial Jobs and their pods (None: no search)."""
        kind, namespace, name = key
        if kind != planner.KIND or not effective.get("search") or not effective.get("output"):
            return None
        cache_key = (namespace, name)
        trials = self.caches.trial_jobs(cache_key, uid)
        return StudyObserved(
            spec=effective,
            prefix=artifact_prefix(effective["output"]["uri"], namespace, kind, name, uid),
            trials=tuple(
                TrialObserved(n, j, tuple(self.caches.job_pods(cache_key, j["metadata"]["uid"])))
                for n, j in sorted(trials.items())
            ),
        )

    def _observe_preflight(
        self, key: Key, uid: str, resolved: planner.Resolved
    ) -> PreflightObserved | None:
        """The pre-flight Job of a GPU FineTuneJob not launched yet (None: no pre-flight)."""
        kind, namespace, name = key
        if not planner.needs_preflight_pod(resolved.spec, self.config, kind):
            return None
        checker = self.caches.preflight_job((namespace, name), uid)
        if checker is None:
            return PreflightObserved(None, ())
        pods = self.caches.job_pods((namespace, name), checker["metadata"]["uid"])
        return PreflightObserved(checker, tuple(pods))

    async def _budget_lock(self, namespace: str, seen: Children) -> asyncio.Lock | None:
        """The namespace's GPU budget lock, held, when this pass may launch GPU Jobs under a cap:
        counting the namespace's GPUs and launching are one step, so two launches at once do
        not both see the same free GPUs."""
        if (
            not planner.spec_gpus(seen.effective)
            or (seen.job is not None and seen.study is None)
            or gpu_budget(self.config.policy, namespace) is None
        ):
            return None
        lock = self._budget_locks.setdefault(namespace, asyncio.Lock())
        await lock.acquire()
        return lock

    async def _plan_and_launch(
        self, key: Key, obj: dict[str, Any], seen: Children, *, budget: bool
    ) -> tuple[Plan, Observed, float | None]:
        """Observed, the plan, and the launches it asks for; with `budget` the namespace's GPU
        budget is counted (under its lock)."""
        namespace = key[1]
        pod_refused = await self._pod_refused(namespace, seen)
        progress = await self._read_progress(key, seen)
        observed = self._observed(key, obj, seen, pod_refused, progress, budget=budget)
        plan = compute_status(obj, observed, datetime.now(UTC))
        if _running_pod(seen) is not None and not plan.delete_job:  # read its progress again
            plan.requeue_after = min(plan.requeue_after or math.inf, self.config.progress_seconds)
        requeue = await self._launch_planned(obj, plan, seen)
        if plan.create_trials:
            await self._launch_trials(obj, seen.resolved, seen.configmap, plan.create_trials)
        await self._launch_node_jobs(obj, plan, seen)
        return plan, observed, requeue

    def _observed(
        self,
        key: Key,
        obj: dict[str, Any],
        seen: Children,
        pod_refused: str | None,
        progress: dict[str, Any] | None,
        *,
        budget: bool,
        record: bool = True,
    ) -> Observed:
        """What `compute_status` is given about a resource and its children; without `record`
        the pods counted are not remembered (another resource's pass looking at this one)."""
        namespace = key[1]
        resolved, effective = seen.resolved, seen.effective
        changed: tuple[str, ...] = ()
        if resolved and seen.launched_spec and seen.launched_hash != resolved.spec_hash:
            changed = tuple(planner.changed_fields(seen.launched_spec, resolved.spec))
        return Observed(
            issues=seen.issues,
            launched_hash=seen.launched_hash,
            current_hash=resolved.spec_hash if resolved else None,
            changed=changed,
            job=seen.job,
            pods=tuple(seen.pods),
            nodes=gang.spec_nodes(effective),
            node_jobs=tuple(seen.node_jobs),
            backoff_limit=int(effective.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)),
            memory=(effective.get("resources") or {}).get("memory"),
            source=seen.gate,
            study=seen.study,
            pods_seen=self._count_pods(key, obj, seen.job, seen.pods, record=record),
            gpus=planner.attempt_gpus(effective),
            pod_refused=pod_refused,
            preflight=seen.preflight,
            progress=progress,
            gpu_budget=(
                namespace_gpu_budget(self.config.policy, namespace, self._gpus_in_use(namespace))
                if budget
                else None
            ),
        )

    async def _read_progress(self, key: Key, seen: Children) -> dict[str, Any] | None:
        """A running FineTuneJob's newest progress, read from its trainer pod's log at most
        every GRAFT_PROGRESS_SECONDS (controller.progress_log); what was read last otherwise.
        A failed read shows no progress this pass and fails nothing."""
        pod = _running_pod(seen) if key[0] == planner.KIND else None
        if pod is None:
            return None
        read_at, fields = self._progress.get(key, (-math.inf, None))
        if time.monotonic() - read_at < self.config.progress_seconds:
            return fields
        try:
            tail = await self.kube.read_log(
                key[1], pod["metadata"]["name"], planner.TRAINER_CONTAINER, TAIL_LINES
            )
        except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
            logger.warning("could not read the progress of %s/%s: %s", key[1], key[2], exc)
            return fields
        newest = latest_progress(tail or "")
        fields = newest if newest is not None else fields
        self._progress[key] = (time.monotonic(), fields)
        return fields

    async def _pod_refused(self, namespace: str, seen: Children) -> str | None:
        """Why the Job controller made no pod for the Job (see `_pod_refusal`); a missing
        ServiceAccount is made again at once."""
        job = seen.job
        # A Job a queue holds (Suspended) has no pod on purpose.
        if job is None or seen.pods or job_finished(job) or true_condition(job, "Suspended"):
            return None
        pod_refused = await self._pod_refusal(job)
        if pod_refused and _missing_service_account(pod_refused):
            # The namespace was deleted and made anew (or the account deleted by hand) since
            # the identity was ensured: ensure it now, not after IDENTITY_TTL.
            self._identities.pop(namespace, None)
            await self._ensure_identity(namespace)
        return pod_refused

    async def _launch_planned(
        self, obj: dict[str, Any], plan: Plan, seen: Children
    ) -> float | None:
        """Create the Job (or the pre-flight Job) the plan asks for; the requeue delay. A
        refusal of the API server is shown on the resource and tried again later."""
        requeue = plan.requeue_after
        if not (plan.create_job or plan.create_preflight):
            return requeue
        references = seen.gate.references if seen.gate is not None else None
        try:
            created = await self._launch(
                obj,
                seen.resolved,
                seen.configmap,
                plan.status,
                references,
                preflight=plan.create_preflight,
            )
        except ApiError as exc:
            if exc.status not in REFUSED:
                raise  # 5xx, 429, a timeout: the queue retries with backoff
            event = launch_refused(obj, plan.status, exc.message, datetime.now(UTC))
            plan.create_job = plan.create_preflight = False
            plan.events += [event] if event else []
            return LAUNCH_RETRY
        if created is None:
            return 1.0  # a previous incarnation's children are being collected
        return requeue

    async def _delete_children(self, plan: Plan, seen: Children, backoff_limit: int) -> None:
        preflight, job, study = seen.preflight, seen.job, seen.study
        if plan.delete_preflight and preflight is not None and preflight.job is not None:
            await self.kube.delete(object_path(preflight.job))
        if plan.delete_job and job is not None:
            await self.kube.delete(object_path(job))
            plan.events.append(Event("Normal", "JobDeleted", f"deleted Job {job_name(job)}"))
        if plan.delete_job:  # a gang's attempt ends as a whole
            for node_job in seen.node_jobs:
                await self.kube.delete(object_path(node_job))
        if plan.delete_job and study is not None:
            for trial in study.trials:
                if observe_trial(trial, backoff_limit)["state"] not in FINISHED:
                    await self.kube.delete(object_path(trial.job))

    async def _write_status(
        self,
        key: Key,
        obj: dict[str, Any],
        plan: Plan,
        seen: Children,
        requeue: float | None,
    ) -> float | None:
        """Patch the status, post the Events, delete an expired resource; the requeue delay."""
        kind, namespace, name = key
        patch = status_patch(obj.get("status") or {}, plan.status)
        if plan.create_job and requeue is None and seen.preflight is None:
            # Just launched: the Job's watch event brings this resource back for its status
            # patch. Under a burst, the queue's other launches go first. (After a pre-flight
            # pod the patch goes now: its findings exist only in this pass.)
            self._set_phase(key, str(plan.status.get("phase")))
            return 2.0
        if patch and not plan.delete_resource:
            patched = await self.kube.merge_patch(
                resource_path(namespace, name, status=True, kind=kind), {"status": patch}
            )
            self.observe(key, patched)
        self._set_phase(key, str(plan.status.get("phase")))
        for event in plan.events:
            self._post(obj, event)
        if plan.delete_resource:
            await self.kube.delete(resource_path(namespace, name, kind=kind))
            self._set_phase(key, None)
            return None
        return requeue

    def _resolve(
        self, key: Key, obj: dict[str, Any]
    ) -> tuple[planner.Resolved | None, tuple[FieldIssue, ...]]:
        """The validated spec, once per spec generation (most passes are status passes)."""
        meta = obj["metadata"]
        version = (str(meta["uid"]), meta.get("generation"))
        held = self._resolved.get(key)
        if held is not None and held[0] == version and version[1] is not None:
            return held[1], held[2]
        resolved: planner.Resolved | None = None
        issues: tuple[FieldIssue, ...] = ()
        try:
            resolved = planner.admit(
                planner.resolve_spec(obj.get("spec"), self.config, key[0], key[1]),
                self.config,
                key[1],
            )
        except InvalidResource as exc:
            issues = tuple(exc.issues)
        self._resolved[key] = (version, resolved, issues)
        return resolved, issues

    def observe(self, key: Key, body: dict[str, Any] | None) -> None:
        """Remember the newest body of a resource (None: it is gone).

        Watch events may arrive after our own patch's response; an older resourceVersion never
        replaces a newer one. (resourceVersions are opaque; where they are not integers the
        latest arrival wins, and the next watch event corrects a stale pass.)
        """
        if body is None:
            self.bodies.pop(key, None)
            return
        held = self.bodies.get(key)
        if held is not None and held["metadata"].get("uid") == body["metadata"].get("uid"):
            old = str(held["metadata"].get("resourceVersion") or "")
            new = str(body["metadata"].get("resourceVersion") or "")
            if old.isdigit() and new.isdigit() and int(new) < int(old):
                return
        self.bodies[key] = body

    def _count_pods(
        self,
        key: Key,
        obj: dict[str, Any],
        job: dict[str, Any] | None,
        pods: list[dict[str, Any]],
        *,
        record: bool = True,
    ) -> int | None:
        """Distinct pods of the current Job, remembered across reconciles (without `record`:
        counted the same way, but nothing remembered or forgotten)."""
        if job is None:
            if record:
                self._pods_seen.pop(key, None)
            return None
        job_uid = str(job["metadata"]["uid"])
        uids = {str(p["metadata"].get("uid") or p["metadata"]["name"]) for p in pods}
        entry = self._pods_seen.get(key)
        if entry is None or entry[0] != job_uid:
            # First sight of this Job in this process: the status counts pods of it that are
            # gone now (before a restart) too.
            counted = int((obj.get("status") or {}).get("attempts") or 0)
            counted -= planner.attempts_before(job)
            entry = (job_uid, max(0, counted - len(uids)), set())
            if record:
                self._pods_seen[key] = entry
        if not record:
            return entry[1] + len(entry[2] | uids)
        entry[2].update(uids)
        return entry[1] + len(entry[2])

    async def _pod_refusal(self, job: dict[str, Any]) -> str | None:
        """Why the Job controller cannot create the pod of a Job that has none after a while:
        its newest FailedCreate Event (a pod quota, a missing PriorityClass, a webhook)."""
        meta = job["metadata"]
        created = parse_time(meta.get("creationTimestamp"))
        if created is None or (datetime.now(UTC) - created).total_seconds() < POD_REFUSAL_GRACE:
            return None
        events = await self.kube.list(
            f"/api/v1/namespaces/{meta['namespace']}/events",
            fields=f"involvedObject.uid={meta['uid']},reason=FailedCreate",
        )
        if not events:
            return None
        newest = max(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
        return str(newest.get("message") or "no message")[:500]

    def _gpus_in_use(self, namespace: str) -> int:
        """GPUs held by the namespace's unfinished Graft Jobs, with the ones just created."""
        held: dict[str, int] = {}
        for job in self.caches.namespace_jobs(namespace):
            meta = job["metadata"]
            if meta.get("deletionTimestamp") or job_finished(job):
                held[meta["name"]] = 0
            else:
                held[meta["name"]] = planner.job_gpus(job)
        claims = self._gpu_claims.get(namespace, {})
        now = time.monotonic()
        for name, (gpus, when) in list(claims.items()):
            if name in held or now - when > CLAIM_TTL:
                del claims[name]  # the cache shows it now (or it never appeared)
            else:
                held[name] = gpus
        return sum(held.values())

    def _claim_gpus(self, job: dict[str, Any]) -> None:
        gpus = planner.job_gpus(job)
        if gpus:
            meta = job["metadata"]
            claims = self._gpu_claims.setdefault(meta["namespace"], {})
            claims[meta["name"]] = (gpus, time.monotonic())

    async def _source_gate(self, key: Key, resolved: planner.Resolved) -> sources.SourceGate | None:
        """Look up the FineTuneJobs a not-yet-launched resource references."""
        kind, namespace, _ = key
        refs = sources.references(kind, resolved.spec)
        self._forget_dependencies(key)
        if not refs:
            return None
        found: dict[str, dict[str, Any] | None] = {}
        for ref in refs:
            if ref.name not in found:
                found[ref.name] = await self._as_its_children_show(namespace, ref.name)
        gate = sources.gate(kind, namespace, resolved.spec, found, self.config)
        if gate.state != "ready":
            for ref in refs:
                self.dependents.setdefault((namespace, ref.name), set()).add(key)
        return gate

    async def _as_its_children_show(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A referenced FineTuneJob with the status this operator computes for it now from
        its own Job, pods and trials, not the status its body carries: the gate (Succeeded,
        a search's best trial) never rests on a status someone else wrote. The referenced
        job's own bookkeeping (the pods counted for its attempts) is left to its own passes."""
        ref_key: Key = (sources.FINETUNE, namespace, name)
        body = self.bodies.get(ref_key) or await self.kube.get(
            resource_path(namespace, name, kind=sources.FINETUNE)
        )
        if body is None or body["metadata"].get("deletionTimestamp"):
            return body
        body = {**body, "kind": sources.FINETUNE}
        seen = await self._children(ref_key, body)
        observed = self._observed(ref_key, body, seen, None, None, budget=False, record=False)
        return {**body, "status": compute_status(body, observed, datetime.now(UTC)).status}

    def _forget_dependencies(self, key: Key) -> None:
        for waiting in self.dependents.values():
            waiting.discard(key)

    def dependents_of(self, namespace: str, name: str) -> list[Key]:
        return sorted(self.dependents.pop((namespace, name), set()))

    async def _launch(
        self,
        obj: dict[str, Any],
        resolved: planner.Resolved | None,
        configmap: dict[str, Any] | None,
        status: dict[str, Any],
        references: dict[str, Any] | None = None,
        *,
        preflight: bool = False,
    ) -> dict[str, Any] | None:
        """The spec ConfigMap (first launch) and the trainer Job; with `preflight`, the Job of
        the CPU pod that checks a GPU FineTuneJob before its GPU pod is created."""
        namespace = obj["metadata"]["namespace"]
        uid = obj["metadata"]["uid"]
        kind = planner.kind_of(obj)
        await self._ensure_identity(namespace)
        attempts = int(status.get("attempts") or 0)
        if configmap is not None:  # launched before (resume): the frozen spec
            spec, _ = planner.launched_spec(configmap)
            created = await self.kube.create(
                planner.build_launched_job(
                    obj,
                    configmap,
                    self.config,
                    attempts_before=attempts,
                    gang_shape=await self._gang_shape(obj, spec, status),
                )
            )
        elif resolved is not None:  # first launch: the spec ConfigMap, then the Job
            wanted = planner.build_spec_configmap(obj, resolved, references)
            # The ConfigMap first: a Job whose pod mounts a missing ConfigMap (its create refused
            # by a quota) or an old incarnation's (a resource deleted and applied again while
            # that one is still being collected) would hang or run the old spec.
            if await self.kube.create(wanted) is None:  # exists: ours, or an old incarnation's
                existing_cm = await self.kube.get(object_path(wanted))
                if existing_cm is None or not _owned_by(existing_cm, uid):
                    return None
                if planner.launched_spec(existing_cm)[1] != resolved.spec_hash:
                    # Ours, from a launch the API server refused: the spec was fixed since.
                    await self.kube.merge_patch(
                        object_path(wanted),
                        {"metadata": wanted["metadata"], "data": wanted["data"]},
                    )
            shape = (
                {}
                if preflight
                else {"gang_shape": await self._gang_shape(obj, resolved.spec, status)}
            )
            build = planner.build_preflight_job if preflight else planner.build_trainer_job
            created = await self.kube.create(
                build(
                    obj,
                    resolved.spec,
                    self.config,
                    spec_hash_=resolved.spec_hash,
                    references=references,
                    **shape,
                )
            )
        else:
            return None
        if preflight:
            name = planner.preflight_job_name(obj["metadata"]["name"])
            if created is not None:
                self._post(obj, Event("Normal", "PreflightCreated", f"created Job {name}"))
            return created
        name = planner.job_name(obj["metadata"]["name"], kind)
        if created is None:
            existing = await self.kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
            if existing is None or not _owned_by(existing, uid):
                return None
            created = existing
        else:
            self.metrics.jobs_created.labels(kind).inc()
            logger.info("created Job %s/%s", namespace, name)
            self._post(obj, Event("Normal", "JobCreated", f"created Job {name}"))
        status["jobName"] = name
        self._claim_gpus(created)
        return created

    async def _gang_shape(
        self, obj: dict[str, Any], spec: dict[str, Any], status: dict[str, Any]
    ) -> planner.GangShape | None:
        """How a multi-node job's attempt is shaped here (None: one pod); its headless
        Service exists first (409: it does), so the pods' names resolve as they start."""
        if gang.spec_nodes(spec) <= 1:
            return None
        await self.kube.create(planner.build_rendezvous_service(obj))
        return planner.GangShape(
            indexed=await self._indexed_jobs(),
            failed_before=int(status.get("failedAttempts") or 0),
        )

    async def _indexed_jobs(self) -> bool:
        """Whether the API server runs Indexed Jobs (Kubernetes 1.22+, where they are on by
        default); asked once. GRAFT_INDEXED_JOBS=true|false overrides."""
        if self._indexed is None:
            if self.config.indexed_jobs is not None:
                self._indexed = self.config.indexed_jobs
            else:
                version = await self.kube.get("/version") or {}
                self._indexed = gang.supports_indexed_jobs(version)
                logger.info(
                    "API server %s: multi-node jobs run as %s",
                    version.get("gitVersion", "?"),
                    "Indexed Jobs" if self._indexed else "one Job per node",
                )
        return self._indexed

    async def _launch_node_jobs(self, obj: dict[str, Any], plan: Plan, seen: Children) -> None:
        """The per-node shape: the Jobs of nodes 1..n-1, told node 0's pod IP."""
        job, configmap = seen.job, seen.configmap
        if not plan.create_node_jobs or job is None or configmap is None or not plan.rendezvous:
            return
        for node in plan.create_node_jobs:
            shape = planner.GangShape(
                indexed=False,
                node=node,
                rendezvous=plan.rendezvous,
                failed_before=gang.failed_before(job),
            )
            made = await self.kube.create(
                planner.build_launched_job(
                    obj,
                    configmap,
                    self.config,
                    attempts_before=planner.attempts_before(job),
                    gang_shape=shape,
                )
            )
            if made is not None:
                self._claim_gpus(made)
                name = gang.node_job_name(obj["metadata"]["name"], node)
                self._post(obj, Event("Normal", "JobCreated", f"created Job {name}"))

    async def _launch_trials(
        self,
        obj: dict[str, Any],
        resolved: planner.Resolved | None,
        configmap: dict[str, Any] | None,
        numbers: list[int],
    ) -> None:
        """The trial Jobs of a search (and the spec ConfigMap they share, the first time)."""
        namespace = obj["metadata"]["namespace"]
        await self._ensure_identity(namespace)
        if configmap is not None:
            spec, spec_hash = planner.launched_spec(configmap)
        elif resolved is not None:
            spec, spec_hash = resolved.spec, resolved.spec_hash
            await self.kube.create(planner.build_spec_configmap(obj, resolved))  # 409: exists
        else:
            return
        jobs = [
            planner.build_trainer_job(obj, spec, self.config, spec_hash_=spec_hash, trial=n)
            for n in numbers
        ]
        created = await asyncio.gather(*(self.kube.create(job) for job in jobs))
        for job, made in zip(jobs, created, strict=True):
            if made is not None:  # None: 409, it exists already
                self._claim_gpus(made)
                self.metrics.jobs_created.labels(planner.kind_of(obj)).inc()
                self._post(obj, Event("Normal", "TrialCreated", f"created Job {job_name(job)}"))

    async def _ensure_identity(self, namespace: str) -> None:
        """The trainer pods' ServiceAccount: created once per namespace, and
        again (409 when it exists) after IDENTITY_TTL, so a namespace deleted and made anew,
        or an identity deleted by hand, is set up again without an operator restart."""
        held = self._identities.get(namespace)
        now = time.monotonic()
        if held is None or now - held[1] > IDENTITY_TTL:
            held = (asyncio.ensure_future(self._create_identity(namespace)), now)
            self._identities[namespace] = held
        try:
            await asyncio.shield(held[0])
        except Exception:
            self._identities.pop(namespace, None)
            raise

    async def _create_identity(self, namespace: str) -> None:
        # 409: it exists, fine.
        manifests = planner.trainer_identity(namespace, self.config)
        await asyncio.gather(*(self.kube.create(manifest) for manifest in manifests))

    def _post(self, obj: dict[str, Any], event: Event) -> None:
        """Post an Event in the background: best effort, never delays a reconcile."""
        self._events.append((time.monotonic(), obj, event))
        if self._poster is None or self._poster.done():
            self._poster = asyncio.ensure_future(self._post_events())

    async def _post_events(self, *, wait: bool = True) -> None:
        while self._events:
            if wait and self.busy() and time.monotonic() - self._events[0][0] < EVENT_DELAY_MAX:
                await asyncio.sleep(0.05)
                continue
            batch = [self._events.popleft() for _ in range(min(len(self._events), 16))]
            await asyncio.gather(*(self._send(obj, event) for _, obj, event in batch))

    async def flush_events(self, timeout: float = 5.0) -> None:
        """Post the Events still waiting (on shutdown)."""
        if self._poster is not None and not self._poster.done():
            self._poster.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._post_events(wait=False), timeout)

    async def _send(self, obj: dict[str, Any], event: Event) -> None:
        try:
            await self.kube.event(obj, event.type, event.reason, event.message)
        except Exception as exc:
            logger.warning("could not post event %s: %s", event.reason, exc)

    def _set_phase(self, key: Key, phase: str | None) -> None:
        old = self._phases.pop(key, None)
        if old is not None:
            self.metrics.phases.labels(key[0], old).dec()
        if phase is not None:
            self._phases[key] = phase
            self.metrics.phases.labels(key[0], phase).inc()


def _running_pod(seen: Children) -> dict[str, Any] | None:
    """The newest running pod of a single-run Job (a search's trials report no progress)."""
    if seen.job is None or seen.study is not None:
        return None
    running = [p for p in seen.pods if (p.get("status") or {}).get("phase") == "Running"]
    if seen.node_jobs or any(gang.node_of(p) for p in running):  # a gang: node 0 reports
        running = [p for p in running if not gang.node_of(p)]
    return running[-1] if running else None


def _missing_service_account(refusal: str) -> bool:
    """A FailedCreate saying the pod's ServiceAccount does not exist (the API server's words:
    `error looking up service account <ns>/<name>: serviceaccount "<name>" not found`)."""
    return "serviceaccount" in refusal.lower() and "not found" in refusal


def job_name(job: dict[str, Any]) -> str:
    return str(job["metadata"]["name"])


def _trial_of(job: dict[str, Any]) -> int | None:
    value = (job["metadata"].get("labels") or {}).get(planner.LABEL_TRIAL)
    return int(value) if value is not None and str(value).isdigit() else None


def _is_preflight(job: dict[str, Any]) -> bool:
    return (job["metadata"].get("labels") or {}).get(planner.LABEL_COMPONENT) == "preflight"


def _ever_launched(obj: dict[str, Any]) -> bool:
    """Whether a Job of this resource has been seen (its status names one or counts pods)."""
    status = obj.get("status") or {}
    return bool(status.get("jobName") or status.get("attempts") or status.get("search"))


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])
