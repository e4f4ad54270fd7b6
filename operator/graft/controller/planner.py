"""The pure planner: from a resource and the operator's configuration to the children it needs.

Owns the *shape* of every child object: the spec ConfigMap (`resource.json`, the frozen launched
spec), the trainer Job and its pod template, and the per-namespace trainer identity. No API calls
here: handlers call these functions and send the result; unit tests call them directly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

from graft.api.base import API_VERSION, DEFAULT_BACKOFF_LIMIT, DEFAULT_GPU_RESOURCE
from graft.api.errors import FieldIssue
from graft.api.kinds import InvalidResource, parse_spec
from graft.contract import (
    ENV_ARTIFACTS_URI,
    ENV_METRICS_PORT,
    ENV_REPORTER,
    ENV_TRIAL,
)
from graft.controller import gang
from graft.controller.config import OperatorConfig
from graft.naming import artifact_prefix, child_name
from graft.policy import (
    default_output,
    place_trainer_pod,
    policy_issues,
    trainer_service_account,
)
from graft.storage.store import BUCKET_CREDENTIALS_ENV, CREDENTIAL_KEYS, HF_TOKENS_ENV
from graft.storage.uri import DEFAULT_PVC_ROOT, parse_uri

KIND = "FineTuneJob"  # the kind a resource without `kind` (a bare spec in a test) is taken as
KINDS = ("FineTuneJob", "OptimizeJob", "AdapterBundle")
# Children of different kinds with the same name live side by side: a FineTuneJob and the
# OptimizeJob exporting it are often named alike.
JOB_SUFFIX = {"FineTuneJob": "train", "OptimizeJob": "optimize", "AdapterBundle": "bundle"}

# Labels on every child (Job, pod template, ConfigMap). Parent labels are never copied: a GitOps
# tool's tracking label (app.kubernetes.io/instance) on a child would make it prune the child.
LABEL_KIND = "graft.dev/kind"
LABEL_NAME = "graft.dev/name"
LABEL_UID = "graft.dev/uid"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_APP = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_TRIAL = "graft.dev/trial"  # on a search trial's Job and pods: the trial number
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

ANNOTATION_SPEC_HASH = "graft.dev/spec-hash"
ANNOTATION_ATTEMPTS_BEFORE = "graft.dev/attempts-before"
ANNOTATION_GPUS = "graft.dev/gpus"  # GPUs the Job's pod holds: the namespace's budget counts it
REFERENCES = "references"  # resource.json: the referenced FineTuneJobs as resolved at launch

TRAINER_CONTAINER = "trainer"
# The trainer's Prometheus endpoint (graft_trainer.observability), when the platform sets a port:
# the variable it reads and the container port's name, which the chart's PodMonitor selects.
METRICS_PORT_ENV = ENV_METRICS_PORT
METRICS_PORT_NAME = "metrics"
TERMINATION_GRACE_SECONDS = 120
RESOURCE_FILE = "resource.json"
SPEC_MOUNT = "/etc/graft"
HOME = "/home/graft"
# Where a shared download cache claim is mounted (spec.resources.cacheClaim).
CACHE_MOUNT = "/var/cache/graft"
# The pre-flight pod downloads the dataset and the model (to check its config and tokenizer,
# and to fill the shared cache for the GPU pod): an hour covers a large model on a slow link.
PREFLIGHT_DEADLINE_SECONDS = 3600

# Spec fields that take effect after launch; every other change is refused.
MUTABLE_FIELDS = ("suspend", "ttlSecondsAfterFinished")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A validated spec with the operator's defaults applied, ready to launch."""

    spec: dict[str, Any]  # camelCase, defaults applied, output resolved
    spec_hash: str  # of the user's spec without the mutable fields

    @property
    def output_uri(self) -> str:
        return str(self.spec["output"]["uri"])


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable digest of the fields that are frozen once the Job exists."""
    frozen = {k: v for k, v in spec.items() if k not in MUTABLE_FIELDS}
    text = json.dumps(frozen, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def kind_of(obj: dict[str, Any]) -> str:
    return str(obj.get("kind") or KIND)


def resolve_spec(
    spec: Any, config: OperatorConfig, kind: str = KIND, namespace: str = ""
) -> Resolved:
    """Validate the spec and apply defaults (the namespace's artifact store, else the
    operator's); raise InvalidResource naming the field."""
    model = parse_spec(kind, spec)
    data = model.to_api()
    if "output" not in data:
        tenant = default_output(config.policy, namespace)
        uri = tenant.uri if tenant is not None else config.output_uri
        secret = tenant.credentials_secret if tenant is not None else config.output_secret
        if not uri:
            raise InvalidResource(
                [
                    FieldIssue(
                        ("spec", "output"),
                        "no artifact store: set spec.output.uri or configure the operator's "
                        "default (GRAFT_OUTPUT_URI, or the policy's namespaces.<ns>.output)",
                    )
                ]
            )
        data["output"] = {"uri": uri}
        if secret:
            data["output"]["credentialsSecret"] = secret
    return Resolved(spec=data, spec_hash=spec_hash(model.to_api()))


def admit(resolved: Resolved, config: OperatorConfig, namespace: str) -> Resolved:
    """The resolved spec if the platform policy allows launching it; InvalidResource with a
    PolicyIssue per broken rule otherwise. Only what is about to be launched is admitted: a
    FineTuneJob that already ran is not judged again when something references it."""
    unreachable = cluster_location_issues(resolved.spec)
    if unreachable:
        raise InvalidResource(unreachable)
    denied = policy_issues(resolved.spec, namespace, config.policy)
    if denied:
        raise InvalidResource(list(denied))
    return resolved


def changed_fields(launched: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Top-level spec fields (dotted, one level deeper for objects) that differ."""
    changed: list[str] = []
    for key in sorted(set(launched) | set(current)):
        if key in MUTABLE_FIELDS:
            continue
        a, b = launched.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    changed.append(f"spec.{key}.{sub}")
        else:
            changed.append(f"spec.{key}")
    return changed


def job_name(name: str, kind: str = KIND) -> str:
    return child_name(name, JOB_SUFFIX[kind])


def attempts_before(job: dict[str, Any]) -> int:
    """Pods that earlier Jobs of the same resource ran (annotated when the Job was built)."""
    value = (job["metadata"].get("annotations") or {}).get(ANNOTATION_ATTEMPTS_BEFORE)
    return int(value) if value and str(value).isdigit() else 0


def trial_job_name(name: str, number: int) -> str:
    return child_name(name, f"trial-{number}")


def configmap_name(name: str, kind: str = KIND) -> str:
    return child_name(name, "spec" if kind == KIND else f"{JOB_SUFFIX[kind]}-spec")


def selection_labels(obj: dict[str, Any]) -> dict[str, str]:
    meta = obj["metadata"]
    return {
        LABEL_KIND: kind_of(obj),
        LABEL_NAME: meta["name"],
        LABEL_UID: meta["uid"],
        LABEL_MANAGED_BY: "graft-operator",
        LABEL_APP: "graft-trainer",
    }


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    # No blockOwnerDeletion: it needs update on finalizers of the parent, and nothing here
    # must outlive the parent anyway (the garbage collector removes Job, pods and ConfigMap).
    return {
        "apiVersion": API_VERSION,
        "kind": kind_of(obj),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


def resource_document(
    obj: dict[str, Any], resolved: Resolved, references: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The whole object as the trainer reads it from resource.json.

    `references` (OptimizeJob, AdapterBundle) are the referenced FineTuneJobs as resolved at
    launch: where their artifacts are and the spec they ran with, so the trainer needs no read
    access to other resources.
    """
    meta = obj["metadata"]
    document: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": kind_of(obj),
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "generation": meta.get("generation", 1),
        },
        "spec": resolved.spec,
    }
    if references:
        document[REFERENCES] = references
    return document


def build_spec_configmap(
    obj: dict[str, Any], resolved: Resolved, references: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ConfigMap holding resource.json: the spec as launched (frozen after launch)."""
    meta = obj["metadata"]
    document = resource_document(obj, resolved, references)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(meta["name"], kind_of(obj)),
            "namespace": meta["namespace"],
            "labels": {**selection_labels(obj), LABEL_COMPONENT: "spec"},
            "annotations": {ANNOTATION_SPEC_HASH: resolved.spec_hash},
            "ownerReferences": [owner_reference(obj)],
        },
        "data": {RESOURCE_FILE: json.dumps(document, indent=2, sort_keys=True)},
    }


def launched_spec(configmap: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The spec and hash a ConfigMap froze at launch."""
    document = json.loads(configmap["data"][RESOURCE_FILE])
    spec_hash_ = configmap["metadata"].get("annotations", {}).get(ANNOTATION_SPEC_HASH, "")
    return document["spec"], spec_hash_


def launched_references(configmap: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(configmap["data"][RESOURCE_FILE])
    return dict(document.get(REFERENCES) or {})


def _located(spec: dict[str, Any]) -> list[tuple[tuple[str | int, ...], dict[str, Any]]]:
    """Every location of a spec of any kind with its field path, the output store last."""
    source = spec.get("source") or {}
    found: list[tuple[tuple[str | int, ...], dict[str, Any]]] = [
        (("spec", k), spec.get(k) or {}) for k in ("model", "dataset", "baseModel")
    ]
    found += [(("spec", "source", k), source.get(k) or {}) for k in ("model", "adapter")]
    found += [(("spec", "adapters", i), a) for i, a in enumerate(spec.get("adapters") or [])]
    # A FineTuneJob's Hub repository to push to: its Secret's HF_TOKEN reaches the pod as an
    # input's does (GRAFT_HF_TOKENS maps the repository to it when Secrets differ).
    found.append((("spec", "publish"), spec.get("publish") or {}))
    return [*found, (("spec", "output"), spec.get("output") or {})]


def _locations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every location of a spec of any kind, the output store last."""
    return [location for _, location in _located(spec)]


def cluster_location_issues(spec: dict[str, Any]) -> list[FieldIssue]:
    """Locations a trainer pod cannot reach: file:// names a folder of the machine `graft run`
    runs on, which a pod does not have."""
    return [
        FieldIssue(
            (*path, "uri"),
            f"{location['uri']!r} is a local path, usable with `graft run` only; on a cluster "
            "use s3://, hf:// or pvc://claim/path",
        )
        for path, location in _located(spec)
        if str(location.get("uri") or "").startswith("file://")
    ]


def _all_locations(spec: dict[str, Any], references: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Referenced FineTuneJobs' locations first (the pod reads their model, data and
    artifacts), then the resource's own, its output store last."""
    locations: list[dict[str, Any]] = []
    for ref in (references or {}).values():
        locations += _locations(ref.get("spec") or {})
    return locations + _locations(spec)


def pvc_claims(spec: dict[str, Any], references: dict[str, Any] | None = None) -> dict[str, bool]:
    """The PersistentVolumeClaims that pvc:// locations name, each with whether the pod writes
    to it: only the resource's own output is written; inputs and everything a referenced
    FineTuneJob wrote are read."""
    claims: dict[str, bool] = {}
    own_output = spec.get("output") or {}
    for location in _all_locations(spec, references):
        uri = str(location.get("uri") or "")
        if uri.startswith("pvc://"):
            claim = parse_uri(uri).netloc
            claims[claim] = claims.get(claim, False) or location is own_output
    for ref in (references or {}).values():
        uri = str(ref.get("uri") or "")
        if uri.startswith("pvc://"):
            claims.setdefault(parse_uri(uri).netloc, False)
    return claims


def credential_secrets(spec: dict[str, Any], references: dict[str, Any] | None = None) -> list[str]:
    """Secret names the pod reads AWS_*/HF_TOKEN from as plain variables; the output store's
    last (it wins where two Secrets hold the same key)."""
    names: list[str] = []
    for location in _all_locations(spec, references):
        name = location.get("credentialsSecret")
        if name:
            if name in names:
                names.remove(name)
            names.append(name)
    return names


def location_credentials_env(
    spec: dict[str, Any], references: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Per-location credentials when locations use different Secrets (with one Secret the
    plain variables from `envFrom` serve every location and nothing is added).

    Each Secret's keys come under its own prefix `GRAFT_SECRET_<i>_`, by reference
    (`secretKeyRef`): the AWS_* keys for the S3 buckets it serves, HF_TOKEN for the hf://
    repositories. Two maps say which: bucket -> prefix (GRAFT_S3_BUCKET_CREDENTIALS) and
    repository -> variable (GRAFT_HF_TOKENS), read by graft.storage.store.
    """
    secrets = credential_secrets(spec, references)
    if len(secrets) < 2:
        return []
    buckets: dict[str, str] = {}  # bucket -> prefix
    repos: dict[str, str] = {}  # org/name -> variable
    wanted: dict[str, tuple[str, str]] = {}  # variable -> (Secret, key)
    for location in _all_locations(spec, references):
        uri, secret = str(location.get("uri") or ""), location.get("credentialsSecret")
        if not secret:
            continue
        prefix = f"GRAFT_SECRET_{secrets.index(secret)}_"
        if uri.startswith("s3://"):
            buckets[parse_uri(uri).netloc] = prefix
            wanted.update({prefix + key: (secret, key) for key in CREDENTIAL_KEYS})
        elif uri.startswith("hf://"):
            repos[parse_uri(uri).netloc] = prefix + "HF_TOKEN"
            wanted[prefix + "HF_TOKEN"] = (secret, "HF_TOKEN")
    env: list[dict[str, Any]] = [
        {"name": name, "value": json.dumps(mapping, sort_keys=True)}
        for name, mapping in ((BUCKET_CREDENTIALS_ENV, buckets), (HF_TOKENS_ENV, repos))
        if mapping
    ]
    for variable, (secret, key) in sorted(wanted.items()):
        ref = {"name": secret, "key": key, "optional": True}
        env.append({"name": variable, "valueFrom": {"secretKeyRef": ref}})
    return env


def hub_env(config: OperatorConfig) -> list[dict[str, Any]]:
    """Where hf:// sources come from. Offline mode is set either way, so an image that bakes
    HF_HUB_OFFLINE=1 still fetches unless the platform asks for offline; no telemetry."""
    env = [
        {"name": "HF_HUB_OFFLINE", "value": "1" if config.hub_offline else "0"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    if config.hub_endpoint:
        env.insert(0, {"name": "HF_ENDPOINT", "value": config.hub_endpoint})
    return env


def pod_security_context(config: OperatorConfig) -> dict[str, Any]:
    uid = config.trainer_run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def container_resources(spec: dict[str, Any], ephemeral_storage: str = "") -> dict[str, Any]:
    res = spec.get("resources") or {}
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for key in ("cpu", "memory"):
        if res.get(key) is not None:
            requests[key] = limits[key] = str(res[key])
    if ephemeral_storage:
        requests["ephemeral-storage"] = ephemeral_storage
    gpu = int(res.get("gpu") or 0)
    if gpu:
        name = res.get("gpuResourceName") or DEFAULT_GPU_RESOURCE
        requests[name] = limits[name] = str(gpu)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def build_trainer_job(
    obj: dict[str, Any],
    spec: dict[str, Any],
    config: OperatorConfig,
    *,
    spec_hash_: str,
    attempts_before: int = 0,
    references: dict[str, Any] | None = None,
    trial: int | None = None,
    gang_shape: GangShape | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer for `obj` with the launched (resolved) `spec`;
    with `trial`, the Job of that trial of the resource's search; with `gang_shape` (a spec
    with resources.nodes > 1), the gang's Indexed Job or one node's Job (controller.gang)."""
    meta = obj["metadata"]
    name, namespace, kind = meta["name"], meta["namespace"], kind_of(obj)
    job_labels = _trainer_job_labels(obj, spec, trial)
    container = _trainer_container(obj, spec, config, references, trial)
    pod_spec = _trainer_pod_spec(obj, config, container)
    _mount_claims(pod_spec, container, spec, config, references)
    if spec_gpus(spec) > 1:
        # One training process per GPU (data parallel): NCCL passes tensors through shared
        # memory, and a container's default /dev/shm (64 MiB) is too small for it.
        pod_spec["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    _trainer_network(pod_spec, container, config)
    _schedule_trainer_pod(pod_spec, spec, config, namespace)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, kind) if trial is None else trial_job_name(name, trial),
            "namespace": namespace,
            "labels": job_labels,
            "annotations": {
                ANNOTATION_SPEC_HASH: spec_hash_,
                ANNOTATION_ATTEMPTS_BEFORE: str(attempts_before),
                ANNOTATION_GPUS: str(spec_gpus(spec)),
            },
            "ownerReferences": [owner_reference(obj)],
        },
        "spec": _trainer_job_spec(spec, config, job_labels, pod_spec),
    }
    if gang_shape is not None and gang.spec_nodes(spec) > 1:
        _shape_gang(job, obj, spec, config, gang_shape, attempts_before)
    return job


def build_launched_job(
    obj: dict[str, Any],
    configmap: dict[str, Any],
    config: OperatorConfig,
    *,
    attempts_before: int,
    gang_shape: GangShape | None = None,
) -> dict[str, Any]:
    """The trainer Job of a resource launched before, from the frozen spec and references of
    its spec ConfigMap (a resumed or restarted attempt, or a gang's other nodes)."""
    spec, spec_hash = launched_spec(configmap)
    return build_trainer_job(
        obj,
        spec,
        config,
        spec_hash_=spec_hash,
        attempts_before=attempts_before,
        references=launched_references(configmap),
        gang_shape=gang_shape,
    )


@dataclasses.dataclass(frozen=True)
class GangShape:
    """Which Job of a multi-node attempt to build (controller.gang)."""

    indexed: bool  # the API server runs Indexed Jobs: one Job for every node
    node: int = 0  # the per-node shape: this node's Job
    rendezvous: str | None = None  # the per-node shape, node > 0: node 0's pod IP
    failed_before: int = 0  # attempts of the gang that failed by the trainer's fault


def _shape_gang(
    job: dict[str, Any],
    obj: dict[str, Any],
    spec: dict[str, Any],
    config: OperatorConfig,
    shape: GangShape,
    attempts_before: int,
) -> None:
    nodes = gang.spec_nodes(spec)
    meta = job["metadata"]
    port = gang.rendezvous_port(
        config.trainer_host_network, str(obj["metadata"]["uid"]), attempts_before
    )
    meta["annotations"][gang.ANNOTATION_FAILED_BEFORE] = str(shape.failed_before)
    if shape.indexed:
        gang.shape_indexed(job, nodes, port)
        meta["annotations"][ANNOTATION_GPUS] = str(spec_gpus(spec) * nodes)
        return
    # The namespace's GPU budget counts the attempt's GPUs on node 0's Job, launched first.
    meta["annotations"][ANNOTATION_GPUS] = str(spec_gpus(spec) * nodes if not shape.node else 0)
    if shape.node:
        meta["name"] = gang.node_job_name(obj["metadata"]["name"], shape.node)
    gang.shape_node_job(job, nodes, shape.node, port, shape.rendezvous)


def build_rendezvous_service(obj: dict[str, Any]) -> dict[str, Any]:
    """The headless Service of a multi-node FineTuneJob's pods (controller.gang)."""
    meta = obj["metadata"]
    labels = {**selection_labels(obj), LABEL_COMPONENT: "trainer"}
    return gang.build_rendezvous_service(
        job_name(meta["name"], kind_of(obj)), meta["namespace"], labels, owner_reference(obj)
    )


def _trainer_job_labels(
    obj: dict[str, Any], spec: dict[str, Any], trial: int | None
) -> dict[str, str]:
    job_labels = {**selection_labels(obj), LABEL_COMPONENT: "trainer"}
    if trial is not None:
        job_labels[LABEL_TRIAL] = str(trial)
    queue = (spec.get("scheduling") or {}).get("queueName")
    if queue:
        job_labels[KUEUE_QUEUE] = queue
    return job_labels


def _trainer_env(
    obj: dict[str, Any],
    spec: dict[str, Any],
    config: OperatorConfig,
    references: dict[str, Any] | None,
    trial: int | None,
) -> list[dict[str, Any]]:
    """The trainer container's environment (the model cache's variables come with its mount)."""
    meta = obj["metadata"]
    name, namespace, kind = meta["name"], meta["namespace"], kind_of(obj)
    env = [
        {
            "name": ENV_ARTIFACTS_URI,
            "value": artifact_prefix(spec["output"]["uri"], namespace, kind, name, meta["uid"]),
        },
        # Progress records on stdout, which the operator reads from the pod's log.
        {"name": ENV_REPORTER, "value": "jsonl"},
        {"name": "HOME", "value": HOME},
    ]
    if trial is not None:
        env.append({"name": ENV_TRIAL, "value": str(trial)})
    env += location_credentials_env(spec, references)
    env += hub_env(config)
    if config.trainer_metrics_port:
        env.append({"name": METRICS_PORT_ENV, "value": str(config.trainer_metrics_port)})
    env.extend({"name": k, "value": v} for k, v in sorted(config.trainer_extra_env.items()))
    return env


def _trainer_container(
    obj: dict[str, Any],
    spec: dict[str, Any],
    config: OperatorConfig,
    references: dict[str, Any] | None,
    trial: int | None,
) -> dict[str, Any]:
    return {
        "name": TRAINER_CONTAINER,
        "image": spec.get("image") or config.trainer_image,
        "imagePullPolicy": config.trainer_image_pull_policy,
        "command": ["graft-trainer", "run-resource", f"{SPEC_MOUNT}/{RESOURCE_FILE}"],
        "env": _trainer_env(obj, spec, config, references, trial),
        "envFrom": [
            {"secretRef": {"name": secret, "optional": False}}
            for secret in credential_secrets(spec, references)
        ],
        "resources": container_resources(spec, config.trainer_ephemeral_storage_request),
        "securityContext": container_security_context(),
        "terminationMessagePath": "/dev/termination-log",
        # Only what the trainer wrote (redacted) reaches status and Events: the log tail that
        # FallbackToLogsOnError would copy may hold anything the process printed.
        "terminationMessagePolicy": "File",
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "home", "mountPath": HOME},
        ],
    }


def _trainer_pod_spec(
    obj: dict[str, Any], config: OperatorConfig, container: dict[str, Any]
) -> dict[str, Any]:
    """The pod around `container`: identity, security context, the spec and scratch volumes."""
    meta = obj["metadata"]
    # Scratch disk: bounded when the platform says so (a pod over it is evicted, not the node).
    scratch = (
        {"sizeLimit": config.trainer_scratch_size_limit}
        if config.trainer_scratch_size_limit
        else {}
    )
    return {
        "restartPolicy": "Never",
        # On SIGTERM the trainer finishes its step and uploads a checkpoint before it exits.
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "serviceAccountName": trainer_service_account(
            config.policy, meta["namespace"], config.trainer_service_account
        ).name,
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(config),
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": configmap_name(meta["name"], kind_of(obj))}},
            {"name": "tmp", "emptyDir": scratch},
            {"name": "home", "emptyDir": dict(scratch)},
        ],
    }


def _mount_claims(
    pod_spec: dict[str, Any],
    container: dict[str, Any],
    spec: dict[str, Any],
    config: OperatorConfig,
    references: dict[str, Any] | None,
) -> None:
    """The claims named by pvc:// locations, and the shared model cache's."""
    # At the path the URI maps to (graft.storage.uri): read-only unless the resource writes
    # its output there.
    for claim, writable in sorted(pvc_claims(spec, references).items()):
        volume = f"pvc-{hashlib.sha256(claim.encode()).hexdigest()[:10]}"
        pod_spec["volumes"].append(
            {
                "name": volume,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable},
            }
        )
        container["volumeMounts"].append(
            {"name": volume, "mountPath": f"{DEFAULT_PVC_ROOT}/{claim}", "readOnly": not writable}
        )
    cache_claim = (spec.get("resources") or {}).get("cacheClaim")
    cache_claim = config.model_cache_claim if cache_claim is None else cache_claim
    if cache_claim:
        # Downloads land on the shared claim (graft_trainer.cache fills entries atomically;
        # huggingface_hub locks its own); the datasets library's cache stays in the pod.
        pod_spec["volumes"].append(
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache_claim}}
        )
        container["volumeMounts"].append({"name": "model-cache", "mountPath": CACHE_MOUNT})
        container["env"] += [
            {"name": "GRAFT_CACHE_DIR", "value": f"{CACHE_MOUNT}/graft"},
            {"name": "HF_HUB_CACHE", "value": f"{CACHE_MOUNT}/hub"},
        ]


def _trainer_network(
    pod_spec: dict[str, Any], container: dict[str, Any], config: OperatorConfig
) -> None:
    if config.trainer_host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    elif config.trainer_metrics_port:
        # Declared for the PodMonitor. Not in the host network: there a declared port is a
        # host port, and the scheduler would put at most one trainer pod on a node. Undeclared,
        # pods on one node share the port: the first serves, the others log a warning and
        # train without an endpoint.
        container["ports"] = [
            {
                "name": METRICS_PORT_NAME,
                "containerPort": config.trainer_metrics_port,
                "protocol": "TCP",
            }
        ]


def _schedule_trainer_pod(
    pod_spec: dict[str, Any], spec: dict[str, Any], config: OperatorConfig, namespace: str
) -> None:
    """Where the pod may run: the platform's pod settings, then the resource's scheduling, then
    the namespace's placement policy."""
    scheduling = spec.get("scheduling") or {}
    platform = config.trainer_pod
    node_selector = {**platform.node_selector, **(scheduling.get("nodeSelector") or {})}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [t.to_api() for t in platform.tolerations]
    tolerations += copy.deepcopy(scheduling.get("tolerations") or [])
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if platform.runtime_class_name:
        pod_spec["runtimeClassName"] = platform.runtime_class_name
    if platform.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in platform.image_pull_secrets]
    if scheduling.get("affinity"):
        pod_spec["affinity"] = copy.deepcopy(scheduling["affinity"])
    if scheduling.get("priorityClassName"):
        pod_spec["priorityClassName"] = scheduling["priorityClassName"]
    place_trainer_pod(
        pod_spec, namespace, config.policy, spec_tolerations=bool(scheduling.get("tolerations"))
    )


def _trainer_job_spec(
    spec: dict[str, Any],
    config: OperatorConfig,
    job_labels: dict[str, str],
    pod_spec: dict[str, Any],
) -> dict[str, Any]:
    # Graft's own labels win: the operator finds its pods by them.
    pod_metadata: dict[str, Any] = {"labels": {**config.trainer_pod.labels, **job_labels}}
    if config.trainer_pod.annotations:
        pod_metadata["annotations"] = dict(config.trainer_pod.annotations)
    job_spec: dict[str, Any] = {
        # The operator enforces spec.backoffLimit itself, counting only the trainer's own
        # failures; the allowance lets evicted pods be replaced by the Job controller.
        "backoffLimit": int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT))
        + config.disruption_allowance,
        "completions": 1,
        "parallelism": 1,
        "template": {"metadata": pod_metadata, "spec": pod_spec},
    }
    deadline = spec.get("activeDeadlineSeconds") or config.policy.default_active_deadline_seconds
    if deadline:
        job_spec["activeDeadlineSeconds"] = int(deadline)
    return job_spec


def preflight_job_name(name: str) -> str:
    return child_name(name, "preflight")


def needs_preflight_pod(spec: dict[str, Any], config: OperatorConfig, kind: str = KIND) -> bool:
    """A FineTuneJob whose pods hold GPUs is checked in a CPU pod first (when the platform
    keeps `trainer.preflight.enabled`): a bad dataset or model then fails holding no GPU."""
    return kind == KIND and config.preflight_pod and spec_gpus(spec) > 0


def build_preflight_job(
    obj: dict[str, Any],
    spec: dict[str, Any],
    config: OperatorConfig,
    *,
    spec_hash_: str,
    references: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Job of the CPU pod that runs a GPU FineTuneJob's checks before its GPU pod exists:
    the trainer's pod with the same image, spec, credentials and cache, but no GPU, small
    requests, and none of the resource's GPU placement (nodeSelector, affinity, the platform's
    GPU runtime class, the Kueue queue, whose quota is for the GPU pod)."""
    resources = {
        "cpu": config.preflight_cpu,
        "memory": config.preflight_memory,
        "cacheClaim": (spec.get("resources") or {}).get("cacheClaim"),
    }
    scheduling = {
        k: v
        for k, v in (spec.get("scheduling") or {}).items()
        if k in ("tolerations", "priorityClassName")
    }
    checked = {**spec, "resources": resources, "scheduling": scheduling}
    job = build_trainer_job(obj, checked, config, spec_hash_=spec_hash_, references=references)
    meta = job["metadata"]
    meta["name"] = preflight_job_name(obj["metadata"]["name"])
    meta["labels"][LABEL_COMPONENT] = "preflight"
    pod = job["spec"]["template"]
    pod["metadata"]["labels"][LABEL_COMPONENT] = "preflight"
    pod["spec"].pop("runtimeClassName", None)
    pod["spec"]["terminationGracePeriodSeconds"] = 30
    container = pod["spec"]["containers"][0]
    container["command"] = ["graft-trainer", "preflight-resource", f"{SPEC_MOUNT}/{RESOURCE_FILE}"]
    # The checks serve no metrics (and the PodMonitor selects trainer pods only).
    container.pop("ports", None)
    container["env"] = [e for e in container["env"] if e["name"] != METRICS_PORT_ENV]
    # One retry for a store or Hub hiccup; a finding of the user's (exit 2) ends it at once.
    job["spec"]["backoffLimit"] = 1
    job["spec"]["activeDeadlineSeconds"] = PREFLIGHT_DEADLINE_SECONDS
    return job


def trainer_identity(namespace: str, config: OperatorConfig) -> list[dict[str, Any]]:
    """The trainer pods' ServiceAccount, with no rights of its own: a trainer reports through
    its log and termination message (graft.contract), so nothing binds a Role to it. It exists
    for the platform: its name and annotations come from the chart's trainer.serviceAccount
    (one cloud role for all) and the namespace's policy (a cloud role per tenant), the policy's
    first, so IRSA or Workload Identity can trust it."""
    account = trainer_service_account(config.policy, namespace, config.trainer_service_account)
    labels = {LABEL_MANAGED_BY: "graft-operator", LABEL_APP: "graft-trainer"}
    sa_meta: dict[str, Any] = {"name": account.name, "namespace": namespace, "labels": labels}
    annotations = {**config.trainer_service_account_annotations, **account.annotations}
    if annotations:
        sa_meta["annotations"] = annotations
    return [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": sa_meta}]


def spec_gpus(spec: dict[str, Any]) -> int:
    """GPUs of one trainer pod."""
    return int((spec.get("resources") or {}).get("gpu") or 0)


def attempt_gpus(spec: dict[str, Any]) -> int:
    """GPUs one attempt holds: every pod of a multi-node job."""
    return spec_gpus(spec) * gang.spec_nodes(spec)


def job_gpus(job: dict[str, Any]) -> int:
    """GPUs a Job's pod holds, from its annotation (the watch cache keeps metadata and status
    only). A Job created before the annotation existed counts as none."""
    annotation = str((job["metadata"].get("annotations") or {}).get(ANNOTATION_GPUS, ""))
    return int(annotation) if annotation.isdigit() else 0
