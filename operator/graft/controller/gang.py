"""Pure: multi-node FineTuneJobs (`spec.resources.nodes` > 1), whose pods train as one gang.

The pods meet through torch.distributed's TCPStore, served by the first process of node 0's
pod. Two shapes of the same attempt:

- **Indexed** (API servers with Indexed Jobs, Kubernetes 1.22+): one Job, `completionMode:
  Indexed`, one pod per node. Each pod's index is its node rank, and its host name
  `<job>-<index>` under the headless Service (`subdomain`) resolves in the cluster DNS, so
  node 0 is `<job>-0.<service>` before any pod exists.
- **Per-node Jobs** (the fallback, e.g. Kubernetes 1.20): node 0's Job first; once its pod has
  an IP, one Job per other node, told that IP. No DNS is needed (the local test cluster has
  none).

Either way every Job has `backoffLimit: 0` (a pod that fails ends its Job) and an attempt is
all of them: when any pod fails, is lost, or cannot be scheduled for a while, the operator
deletes every Job of the attempt and starts the next from the last checkpoint
(`judge_attempt`). The Job controller never replaces one pod of a gang on its own: the others
would wait on the lost one's collectives.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from graft.contract import (
    ENV_NODE_RANK,
    ENV_NODES,
    ENV_RENDEZVOUS_ADDR,
    ENV_RENDEZVOUS_PORT,
)
from graft.exit_codes import EXIT_PEER_LOST
from graft.naming import child_name


class PodOutcome(Protocol):
    """What controller.pods.PodOutcome tells (not imported: pods imports the planner, which
    shapes gangs with this module)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def exit_code(self) -> int | None: ...


LABEL_NODE = "graft.dev/node"  # per-node Jobs and their pods: the node rank
ANNOTATION_RENDEZVOUS = "graft.dev/rendezvous"  # per-node Jobs: node 0's address they were told
ANNOTATION_FAILED_BEFORE = "graft.dev/failed-attempts-before"
# Set by the Job controller on each pod of an Indexed Job.
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RENDEZVOUS_PORT = 29500
# In the host network, pods of several jobs share a node's ports: each job and attempt gets
# its own port in [HOST_PORT_BASE, HOST_PORT_BASE + HOST_PORT_SPAN), so a pod of the previous
# attempt still shutting down cannot hold the next one's.
HOST_PORT_BASE = 29500
HOST_PORT_SPAN = 2000
# A gang whose pod stays unschedulable this long while others hold their nodes is restarted:
# the pods that run give their GPUs back, and the next attempt is scheduled afresh.
UNSCHEDULABLE_GRACE_SECONDS = 600.0


def spec_nodes(spec: dict[str, Any]) -> int:
    return int((spec.get("resources") or {}).get("nodes") or 1)


def service_name(job_name: str) -> str:
    """The headless Service of a multi-node job: the trainer Job's name."""
    return job_name


def node_job_name(resource: str, node: int) -> str:
    """The per-node Job of node `node` ≥ 1 (node 0's is the trainer Job)."""
    return child_name(resource, f"train-node-{node}")


def rendezvous_port(host_network: bool, uid: str, attempt: int) -> int:
    if not host_network:
        return RENDEZVOUS_PORT
    seed = int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16)
    return HOST_PORT_BASE + (seed + attempt) % HOST_PORT_SPAN


def build_rendezvous_service(
    job_name: str, namespace: str, pod_labels: dict[str, str], owner: dict[str, Any]
) -> dict[str, Any]:
    """The headless Service whose name is the pods' `subdomain`: with cluster DNS, node k's
    pod of an Indexed Job is `<job>-<k>.<service>`. Not-ready pods are published, since the
    pods meet before any of them could be called ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(job_name),
            "namespace": namespace,
            "labels": dict(pod_labels),
            "ownerReferences": [owner],
        },
        "spec": {
            "clusterIP": "None",
            "selector": dict(pod_labels),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _spread(pod: dict[str, Any], labels: dict[str, str]) -> None:
    """Prefer one pod per node (a pod asking for a node's GPUs gets one anyway; CPU pods may
    share a node, as on a one-node test cluster). A spec's own podAntiAffinity wins."""
    affinity = pod.setdefault("affinity", {})
    if "podAntiAffinity" in affinity:
        return
    affinity["podAntiAffinity"] = {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {"matchLabels": dict(labels)},
                    "topologyKey": "kubernetes.io/hostname",
                },
            }
        ]
    }


def _gang_labels(job: dict[str, Any]) -> dict[str, str]:
    """The labels every pod of the gang carries (the Job's own: not the node's)."""
    return {k: v for k, v in job["metadata"]["labels"].items() if k != LABEL_NODE}


def shape_indexed(job: dict[str, Any], nodes: int, port: int) -> None:
    """Turn the trainer Job into the gang's Indexed Job: one pod per node."""
    name = job["metadata"]["name"]
    spec = job["spec"]
    spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes, backoffLimit=0)
    pod = spec["template"]["spec"]
    pod["subdomain"] = service_name(name)
    _spread(pod, _gang_labels(job))
    container = pod["containers"][0]
    container["env"] += [
        _env(ENV_NODES, str(nodes)),
        {
            "name": ENV_NODE_RANK,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}},
        },
        _env(ENV_RENDEZVOUS_ADDR, f"{name}-0.{service_name(name)}"),
        _env(ENV_RENDEZVOUS_PORT, str(port)),
    ]


def shape_node_job(
    job: dict[str, Any], nodes: int, node: int, port: int, rendezvous: str | None = None
) -> None:
    """Turn the trainer Job into node `node`'s Job of the per-node shape. Node 0's pod serves
    the rendezvous at its own IP; the others are told it (`rendezvous`)."""
    meta, spec = job["metadata"], job["spec"]
    meta["labels"][LABEL_NODE] = str(node)
    spec["template"]["metadata"]["labels"][LABEL_NODE] = str(node)
    spec["backoffLimit"] = 0
    _spread(spec["template"]["spec"], _gang_labels(job))
    container = spec["template"]["spec"]["containers"][0]
    if node == 0:
        addr: dict[str, Any] = {
            "name": ENV_RENDEZVOUS_ADDR,
            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
        }
    else:
        assert rendezvous, "a node other than 0 is told where node 0 is"
        meta["annotations"][ANNOTATION_RENDEZVOUS] = rendezvous
        addr = _env(ENV_RENDEZVOUS_ADDR, rendezvous)
    container["env"] += [
        _env(ENV_NODES, str(nodes)),
        _env(ENV_NODE_RANK, str(node)),
        addr,
        _env(ENV_RENDEZVOUS_PORT, str(port)),
    ]


def node_of(obj: dict[str, Any]) -> int | None:
    """A pod's (or per-node Job's) node rank; None when it is not part of a gang."""
    meta = obj.get("metadata") or {}
    text = str((meta.get("labels") or {}).get(LABEL_NODE, ""))
    if not text:
        text = str((meta.get("annotations") or {}).get(INDEX_ANNOTATION, ""))
    return int(text) if text.isdigit() else None


def node0_address(pods: list[dict[str, Any]]) -> str | None:
    """The IP of node 0's pod, once it has one (the per-node shape waits for it)."""
    for pod in pods:
        if node_of(pod) == 0 and (pod.get("status") or {}).get("podIP"):
            return str(pod["status"]["podIP"])
    return None


def failed_before(job: dict[str, Any]) -> int:
    text = str((job["metadata"].get("annotations") or {}).get(ANNOTATION_FAILED_BEFORE, "0"))
    return int(text) if text.isdigit() else 0


@dataclasses.dataclass(frozen=True)
class AttemptEnd:
    """Why an attempt of a gang is over (every Job of it is deleted and the next started)."""

    counted: bool  # a trainer failure: counts toward backoffLimit
    message: str  # names the pod


def judge_attempt(
    nodes: int,
    outcomes: Sequence[PodOutcome],
    *,
    jobs_failed: list[str],
    unschedulable_since: dict[str, datetime],
    now: datetime,
    pods_seen: int | None = None,
) -> AttemptEnd | None:
    """Whether the attempt of `nodes` pods is over, and why; None while it may still finish.

    A pod that failed by the trainer's own fault counts (once per attempt). Its peers' exits
    are its echo: they exit with EXIT_PEER_LOST, and the Job controller deletes the pods still
    running in a failed Job. A pod lost (deleted, evicted, preempted) with no such failure
    counts nothing: its peers' EXIT_PEER_LOST is the loss's echo.

    EXIT_PEER_LOST while every pod the attempt ever had (`pods_seen`, distinct pods) is still
    there, none going away, is no loss's echo: a peer hung (its collective timed out) or the
    network between the nodes broke. That counts, or such a job would restart without end."""
    failed = [o for o in outcomes if o.kind == "failed"]
    causes = [o for o in failed if o.exit_code != EXIT_PEER_LOST]
    if causes:
        first = causes[0]
        return AttemptEnd(
            True, f"pod {first.name} failed (exit code {first.exit_code}: {first.message})"
        )
    lost = [o for o in outcomes if o.kind == "disrupted"]
    if lost:
        first = lost[0]
        return AttemptEnd(False, f"pod {first.name} was lost ({first.reason}: {first.message})")
    if failed:  # only pods that lost a peer
        first = failed[0]
        if len(outcomes) >= nodes and pods_seen is not None and pods_seen <= len(outcomes):
            return AttemptEnd(
                True,
                f"pod {first.name} lost a peer pod ({first.message}) while all {nodes} pods "
                "were still there: a peer hung or the network between them broke",
            )
        # The pod that went away is gone already (a replacement counts as a pod seen).
        return AttemptEnd(False, f"pod {first.name} lost a peer pod ({first.message})")
    if jobs_failed:
        return AttemptEnd(False, f"Job {jobs_failed[0]} lost its pod")
    for name, since in sorted(unschedulable_since.items()):
        if (now - since).total_seconds() > UNSCHEDULABLE_GRACE_SECONDS:
            return AttemptEnd(
                False,
                f"pod {name} could not be scheduled for {int((now - since).total_seconds())} s "
                f"while the other pods of the {nodes} held their nodes",
            )
    return None


def unschedulable_since(pods: list[dict[str, Any]]) -> dict[str, datetime]:
    """The pods the scheduler refuses, and since when, while another pod of the gang runs
    (a gang that does not fit at all just waits: restarting it would change nothing)."""
    if not any((p.get("status") or {}).get("phase") == "Running" for p in pods):
        return {}
    found: dict[str, datetime] = {}
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
                and cond.get("lastTransitionTime")
            ):
                since = datetime.fromisoformat(
                    str(cond["lastTransitionTime"]).replace("Z", "+00:00")
                )
                found[str(pod["metadata"]["name"])] = since
    return found


def supports_indexed_jobs(version: dict[str, Any]) -> bool:
    """Indexed Jobs from a /version answer: on by default from Kubernetes 1.22 (beta; alpha
    behind a feature gate in 1.21). Distributions write minors like "28+"."""
    major = str(version.get("major") or "").rstrip("+")
    minor = str(version.get("minor") or "").rstrip("+")
    if not (major.isdigit() and minor.isdigit()):
        return False
    return (int(major), int(minor)) >= (1, 22)
