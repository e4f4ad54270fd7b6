"""Least privilege, shown by the API server itself: the chart grants the operator exactly the API
verbs its code uses.

The chart is installed (its RBAC bound to its ServiceAccount, as in test_chart_rbac.py), the
real operator runs with that ServiceAccount's token and the Deployment's own environment, and
a scenario walks every code path that touches the API: a launch (trainer identity, spec
ConfigMap, Job, Events), an invalid spec, a trainer that refuses its input, suspend and resume,
a launch the API server refuses and the fixed spec after it, a pod the Job controller cannot
create, a Job name already taken, an
OptimizeJob and an AdapterBundle waiting for, then using, a FineTuneJob, and the three kinds
deleted by ttlSecondsAfterFinished. Then the apiserver's audit log (e2e/cluster/README.md) says
what the operator's ServiceAccount asked for: nothing may have been refused, and the set of
(apiGroup, resource[/subresource], verb) it used must equal the set the chart grants.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.cluster import ClusterInfo
from tests.integration.operator_kit import NO_NODE, Cluster, Operator, create_quota, wait_for
from tests.integration.test_chart_rbac import _release, allowed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

GROUP, VERSION = "graft.dev", "v1alpha1"
RBAC = "rbac.authorization.k8s.io"
Verb = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# Verbs that are never a request of their own (checked by the API server inside another, such
# as `bind` in a RoleBinding's create): none since trainers hold no role.
NOT_A_REQUEST: set[Verb] = set()


def audit_events(log: Path) -> Iterator[dict[str, Any]]:
    """Every event of the audit log, the rotated file (audit-<time>.log) included."""
    for path in [*sorted(log.parent.glob(f"{log.stem}-*{log.suffix}")), log]:
        if not path.exists():
            continue
        with path.open() as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def read_by(log: Path, user: str, path: str) -> bool:
    """Whether `user` has sent a GET of `path` (whatever the answer)."""
    return any(
        e.get("user", {}).get("username") == user and e["verb"] == "get" and e["requestURI"] == path
        for e in audit_events(log)
    )


def used_by(events: Iterable[dict[str, Any]], user: str) -> tuple[set[Verb], set[str], list[str]]:
    """What `user` asked for: resource verbs, non-resource paths, and every refused request."""
    verbs: set[Verb] = set()
    paths: set[str] = set()
    refused: Counter[str] = Counter()
    for event in events:
        if (event.get("user") or {}).get("username") != user:
            continue
        ref = event.get("objectRef")
        if ref is None:  # /api, /apis, /apis/graft.dev/v1alpha1, /version: discovery
            paths.add(event["requestURI"].split("?")[0])
        else:
            resource = ref["resource"] + (
                f"/{ref['subresource']}" if ref.get("subresource") else ""
            )
            verbs.add((ref.get("apiGroup") or "", resource, event["verb"]))
        code = (event.get("responseStatus") or {}).get("code")
        if code == 403:
            why = (event.get("annotations") or {}).get("authorization.k8s.io/decision", "?")
            refused[f"{event['verb']} {event['requestURI']} -> 403 (decision: {why})"] += 1
    return verbs, paths, [f"{n} x {line}" for line, n in sorted(refused.items())]


def granted_to(api: Any, namespace: str, account: str, watched: str) -> set[Verb]:
    """The chart's rules bound to the ServiceAccount, expanded: its (Cluster)RoleBindings and
    the roles they name, as the API server holds them. Roles of `watched` count (namespaced
    scope)."""
    from kubernetes import client as k8s

    rbac = k8s.RbacAuthorizationV1Api(api)
    subject = ("ServiceAccount", account, namespace)

    def bound(binding: Any) -> bool:
        return any((s.kind, s.name, s.namespace) == subject for s in binding.subjects or [])

    roles: list[Any] = []
    for binding in rbac.list_cluster_role_binding().items:
        if bound(binding):
            roles.append(rbac.read_cluster_role(binding.role_ref.name))
    for ns in {namespace, watched}:
        for binding in rbac.list_namespaced_role_binding(ns).items:
            if not bound(binding):
                continue
            if binding.role_ref.kind == "ClusterRole":
                roles.append(rbac.read_cluster_role(binding.role_ref.name))
            else:
                roles.append(rbac.read_namespaced_role(binding.role_ref.name, ns))
    granted: set[Verb] = set()
    for role in roles:
        for rule in role.rules or []:
            assert not rule.non_resource_urls, f"{role.metadata.name}: {rule}"
            wild = {"*"} & {*(rule.api_groups or []), *(rule.resources or []), *rule.verbs}
            assert not wild, f"{role.metadata.name} grants a wildcard, more than a test can show"
            for group in rule.api_groups or []:
                for resource in rule.resources or []:
                    granted.update((group, resource, verb) for verb in rule.verbs)
    return granted


def token_kubeconfig(admin_kubeconfig: Path, token: str, path: Path) -> Path:
    """The admin kubeconfig's cluster (server, CA) with the ServiceAccount's token as user."""
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster["cluster"]}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [
                    {"name": "operator", "context": {"cluster": "local", "user": "operator"}}
                ],
                "current-context": "operator",
            }
        )
    )
    path.chmod(0o600)
    return path


class Kinds:
    """OptimizeJobs and AdapterBundles (Cluster speaks FineTuneJobs), and status of any kind."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.custom, self.ns = cluster, cluster.custom, cluster.ns

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {"scheduling": {"nodeSelector": NO_NODE}, **spec},
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, body)

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.ns, plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def condition(self, plural: str, name: str, type_: str) -> dict[str, Any]:
        for cond in ((self.get(plural, name) or {}).get("status") or {}).get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return {}

    def wait_reason(self, plural: str, name: str, type_: str, reason: str) -> None:
        wait_for(
            f"{plural}/{name} {type_} reason {reason}",
            lambda: self.condition(plural, name, type_).get("reason") == reason,
            30,
        )

    def finish(self, name: str) -> None:
        """What a kubelet would report when the trainer of `name` exits 0."""
        self.cluster.pod_terminated(self.cluster.wait_pod(name, timeout=30), 0, reason="Completed")

    def wait_gone(self, plural: str, name: str) -> None:
        wait_for(f"{plural}/{name} deleted by its TTL", lambda: self.get(plural, name) is None, 60)


def scenario(cluster: Cluster, audit_log: Path, user: str) -> None:
    """Every code path of the operator that calls the API, each waited for."""
    from kubernetes import client as k8s

    kinds = Kinds(cluster)
    ftj = "finetunejobs"

    # A launch: trainer identity (a ServiceAccount with no rights), the spec ConfigMap, the
    # Job, Events, status, the running pod's progress read from its log. Then suspend (the Job deleted) and resume (the
    # Job created again from the frozen spec in the ConfigMap).
    cluster.create_ftj("pause")
    cluster.pod_running(cluster.wait_pod("pause"))
    cluster.wait_phase("pause", "Running", 30)
    cluster.patch_ftj("pause", {"suspend": True})
    cluster.wait_phase("pause", "Suspended", 30)
    wait_for("the Job deleted on suspend", lambda: cluster.jobs("pause") == [], 30)
    cluster.patch_ftj("pause", {"suspend": False})
    wait_for("the Job created again on resume", lambda: cluster.jobs("pause"), 30)

    # A multi-node job: its headless Service (create; /version is asked once, a discovery
    # read), node 0's Job.
    cluster.create_ftj("gang", resources={"nodes": 2})
    wait_for("the gang's Service", lambda: cluster.core.list_namespaced_service(cluster.ns).items)
    wait_for("node 0's Job", lambda: cluster.jobs("gang"), 30)

    # An invalid spec: InvalidSpec, nothing launched.
    cluster.create_ftj("invalid", training={"earlyStopping": {"patience": 2}})
    kinds.wait_reason(ftj, "invalid", "Validated", "InvalidSpec")
    assert cluster.jobs("invalid") == []

    # The trainer refuses its input (exit code 2): InvalidInput, the unfinished Job stopped.
    cluster.create_ftj("input")
    cluster.pod_terminated(cluster.wait_pod("input"), 2, message="unknown model")
    kinds.wait_reason(ftj, "input", "Failed", "InvalidInput")
    wait_for("the Job of a refused input deleted", lambda: cluster.jobs("input") == [], 30)

    # A Job the API server refuses (an invalid affinity): LaunchRefused, its ConfigMap left
    # behind. The fixed spec brings that ConfigMap up to date (get, patch), then launches.
    bogus = {"key": "zone", "operator": "Bogus", "values": ["a"]}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [bogus]}]
            }
        }
    }
    cluster.create_ftj("refused", scheduling={"nodeSelector": NO_NODE, "affinity": affinity})
    kinds.wait_reason(ftj, "refused", "Running", "LaunchRefused")
    cluster.patch_ftj("refused", {"scheduling": {"affinity": None}})
    wait_for("the fixed spec launched", lambda: cluster.jobs("refused"), 45)

    # A Job whose pod the Job controller cannot create (a pod quota): the operator lists that
    # Job's FailedCreate Events and says why (PodCreateRefused).
    create_quota(cluster, "no-pods", {"pods": "0"})
    cluster.create_ftj("podless")
    wait_for(
        "PodCreateRefused",
        lambda: kinds.condition(ftj, "podless", "Running").get("reason") == "PodCreateRefused",
        120,
    )
    cluster.core.delete_namespaced_resource_quota("no-pods", cluster.ns)

    # The Job's name is taken by a Job that is not ours: create answers 409, the operator reads
    # that Job, leaves it alone and tries again; once it is gone, the launch goes through.
    blocker = {
        "metadata": {"name": "taken-train"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": NO_NODE,
                    "containers": [{"name": "c", "image": "graft/trainer:it"}],
                }
            }
        },
    }
    cluster.batch.create_namespaced_job(cluster.ns, blocker)
    cluster.create_ftj("taken")

    wait_for(
        "the operator to read the Job in its way",
        lambda: read_by(
            audit_log, user, f"/apis/batch/v1/namespaces/{cluster.ns}/jobs/taken-train"
        ),
        30,
    )
    cluster.batch.delete_namespaced_job(
        "taken-train", cluster.ns, body=k8s.V1DeleteOptions(propagation_policy="Background")
    )
    wait_for("the launch once the name is free", lambda: cluster.jobs("taken"), 45)

    # An OptimizeJob and an AdapterBundle: first waiting for their FineTuneJob (one missing,
    # looked up by name), then launched once it succeeded; each deleted by its TTL when done.
    kinds.create(
        "optimizejobs",
        "OptimizeJob",
        "export",
        {"source": {"fineTuneJobRef": {"name": "src"}}, "ttlSecondsAfterFinished": 1},
    )
    kinds.wait_reason("optimizejobs", "export", "Running", "SourceNotFound")
    cluster.create_ftj("src")
    kinds.finish("src")
    cluster.wait_phase("src", "Succeeded", 30)
    kinds.create(
        "adapterbundles",
        "AdapterBundle",
        "bundle",
        {
            "adapters": [{"name": "a", "fineTuneJobRef": {"name": "src"}}],
            "ttlSecondsAfterFinished": 1,
        },
    )
    for plural, name in (("optimizejobs", "export"), ("adapterbundles", "bundle")):
        kinds.finish(name)
        kinds.wait_gone(plural, name)
    # ttlSecondsAfterFinished may be set after the end, too.
    cluster.patch_ftj("src", {"ttlSecondsAfterFinished": 1})
    kinds.wait_gone(ftj, "src")

    # A deleted resource's watch event (and its Job's) brings it back to the queue with no body
    # to act on: the operator reads it from the API server (404) before forgetting it.
    for plural, name in (("optimizejobs", "export"), ("adapterbundles", "bundle"), (ftj, "src")):
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{cluster.ns}/{plural}/{name}"
        wait_for(f"a last look at {path}", lambda p=path: read_by(audit_log, user, p), 30)


def test_the_chart_grants_exactly_what_the_operator_uses(
    control_plane: ClusterInfo, tmp_path: Path
) -> None:
    audit_log = control_plane.audit_log
    if audit_log is None:
        pytest.skip(
            "this cluster writes no audit log the test can read (an existing cluster, or a "
            "local one started before its apiserver had an audit policy: `make cluster-down`)"
        )
    from kubernetes import client as k8s

    control_plane.kubectl("apply", "-f", str(Path(__file__).parents[2] / "crds"))
    admin = control_plane.api_client()
    core = k8s.CoreV1Api(admin)
    work = f"lp-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": work}})
    values = {
        "watchNamespaces": [work],
        "output": {"uri": "s3://graft-artifacts/it/", "credentialsSecret": "graft-s3"},
        "trainer": {"image": "graft/trainer:it"},
    }
    failure: Exception | None = None
    try:
        with contextlib.contextmanager(_release)(control_plane, values) as (name, namespace, _):
            deployment = k8s.AppsV1Api(admin).read_namespaced_deployment(name, namespace)
            pod = deployment.spec.template.spec
            account = pod.service_account_name
            user = f"system:serviceaccount:{namespace}:{account}"
            token = core.create_namespaced_service_account_token(
                account,
                namespace,
                k8s.AuthenticationV1TokenRequest(
                    spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
                ),
            ).status.token
            kubeconfig = token_kubeconfig(
                control_plane.kubeconfig, token, tmp_path / "operator.kubeconfig"
            )
            # The operator as the chart's Deployment configures it; only its metrics endpoint
            # and log format are the test's.
            env = {e.name: e.value or "" for e in pod.containers[0].env or []}
            for own in ("GRAFT_METRICS_PORT", "GRAFT_METRICS_HOST", "GRAFT_LOG_FORMAT"):
                env.pop(own, None)
            assert env["GRAFT_WATCH_NAMESPACES"] == work
            op = Operator(kubeconfig, work, tmp_path / "operator.log", **env)
            op.start()
            try:
                scenario(Cluster(admin, work), audit_log, user)
            except Exception as exc:  # judged below, with what the audit log says was refused
                failure = exc
                print(op.log.read_text()[-6000:] if op.log.exists() else "")
            finally:
                op.stop()  # before the namespace goes: nothing refused for a namespace ending
            granted = granted_to(admin, namespace, account, work)
            assert not allowed(admin, user, "bind", "clusterroles", group=RBAC, name="admin")
            assert not allowed(admin, user, "get", "finetunejobs", work, GROUP, "status")
    finally:
        core.delete_namespace(work)
    used, paths, refused = used_by(audit_events(audit_log), user)

    assert not refused, (
        "the API server refused the operator (the chart lacks these verbs):\n  "
        + "\n  ".join(refused)
        + (f"\nand so the scenario stopped: {failure}" if failure else "")
    )
    if failure is not None:
        raise failure
    assert ("", "pods/log", "get") in used  # the running pod's progress
    assert granted >= NOT_A_REQUEST, NOT_A_REQUEST - granted
    # Discovery reads (/api, /apis, /apis/<group>/<version>) carry no objectRef and are every
    # authenticated user's by the default system:discovery ClusterRole, not the chart's.
    assert all(p.split("/")[1] in ("api", "apis", "version") for p in paths), sorted(paths)
    unused = granted - NOT_A_REQUEST - used
    missing = used - granted

    def lines(verbs: set[Verb]) -> str:
        return "".join(f"\n    {g or 'core'} {r} {v}" for g, r, v in sorted(verbs)) or " none"

    assert not unused and not missing, (
        "the chart's RBAC and the operator's use differ"
        f"\n  granted but never used:{lines(unused)}"
        f"\n  used but not granted:{lines(missing)}"
    )
    # Jobs, pods and ConfigMaps are selected by the API server: every list and watch of them
    # asks only for Graft's children (label selector), never every object of the namespace.
    children = [
        e
        for e in audit_events(audit_log)
        if (e.get("user") or {}).get("username") == user
        and e["verb"] in ("list", "watch")
        and (e.get("objectRef") or {}).get("resource") in ("jobs", "pods", "configmaps")
    ]
    assert children, "no list or watch of the children was audited"
    unselected = [e["requestURI"] for e in children if "labelSelector=" not in e["requestURI"]]
    assert not unselected, unselected
