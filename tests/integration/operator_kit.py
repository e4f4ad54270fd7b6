"""Helpers for the operator's integration tests: run `python -m graft.controller` as a
subprocess against the test cluster, make FineTuneJobs, and act as a kubelet would by patching
pod status. Trainer pods get a nodeSelector no node matches, so no real kubelet ever touches
them, whether the session cluster is control-plane or full."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "graft.dev", "v1alpha1", "finetunejobs"
NO_NODE = {"graft.dev/test-no-node": "true"}
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T], timeout: float = 60, interval: float = 0.2) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def create_quota(cluster: Cluster, name: str, hard: dict[str, str]) -> None:
    """A ResourceQuota, once the quota controller has counted its usage: until then the API
    server may admit what the quota forbids (a race a test would otherwise lose sometimes)."""
    cluster.core.create_namespaced_resource_quota(
        cluster.ns, {"metadata": {"name": name}, "spec": {"hard": hard}}
    )
    wait_for(
        f"quota {name} in force",
        lambda: cluster.core.read_namespaced_resource_quota(name, cluster.ns).status.hard or {},
        30,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_operator(
    full_cluster: Any, namespaces: list[str], log: Path, trainer_image: str, **env: str
) -> Operator:
    """The operator as a host process serving `namespaces` of the full local cluster, its
    trainer pods (the real image) in the host network. They never call the API server: the
    operator reads their progress from their logs and their outcome from their termination
    messages."""
    return Operator(
        Path(full_cluster.kubeconfig),
        ",".join(namespaces),
        log,
        GRAFT_TRAINER_IMAGE=trainer_image,
        GRAFT_TRAINER_IMAGE_PULL_POLICY="IfNotPresent",
        GRAFT_TRAINER_HOST_NETWORK="true",
        **env,
    )


class Operator:
    """The operator as a child process, stoppable and killable at any moment."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, **env: str) -> None:
        self.kubeconfig, self.namespace, self.log = kubeconfig, namespace, log
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "GRAFT_WATCH_NAMESPACES": namespace,
            "GRAFT_TRAINER_IMAGE": "graft/trainer:it",
            "GRAFT_OUTPUT_URI": "s3://graft-artifacts/it/",
            "GRAFT_OUTPUT_SECRET": "graft-s3",
            "GRAFT_LOG_FORMAT": "text",
            "GRAFT_METRICS_HOST": "127.0.0.1",
            "GRAFT_METRICS_PORT": str(self.metrics_port),
            "GRAFT_RESYNC_SECONDS": "5",
            "GRAFT_PROGRESS_SECONDS": "2",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "graft.controller"],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return r.read().decode()


class Cluster:
    """Thin sync helpers over the kubernetes client for one test namespace."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.ns = namespace
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)

    def create_ftj(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "model": {
                    "uri": "s3://graft-artifacts/models/tiny/",
                    "credentialsSecret": "graft-s3",
                },
                "dataset": {"uri": "s3://graft-artifacts/data/p.jsonl", "textTemplate": "{a} {b}"},
                "scheduling": {"nodeSelector": NO_NODE},
                **spec,
            },
        }
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, body
        )
        return result

    def ftj(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, name
            )
            return obj
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_ftj(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec}
        )

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        obj = self.ftj(name) or {}
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return None

    def wait_reason(
        self, name: str, type_: str, reason: str, timeout: float = 60
    ) -> dict[str, Any]:
        """The condition `type_` of FineTuneJob `name` once its reason is `reason`."""

        def probe() -> dict[str, Any] | None:
            cond = self.condition(name, type_)
            return cond if cond and cond["reason"] == reason else None

        return wait_for(f"{name} {type_} reason {reason}", probe, timeout)

    def phase(self, name: str) -> str | None:
        return ((self.ftj(name) or {}).get("status") or {}).get("phase")

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        wait_for(f"{name} phase {phase}", lambda: self.phase(name) == phase, timeout)
        obj = self.ftj(name)
        assert obj is not None
        return obj

    def jobs(self, name: str | None = None) -> list[Any]:
        selector = f"graft.dev/name={name}" if name else "graft.dev/kind=FineTuneJob"
        return list(self.batch.list_namespaced_job(self.ns, label_selector=selector).items)

    def pods(self, name: str) -> list[Any]:
        pods = self.core.list_namespaced_pod(self.ns, label_selector=f"graft.dev/name={name}")
        return sorted(pods.items, key=lambda p: p.metadata.creation_timestamp)

    def wait_pod(self, name: str, exclude: set[str] = frozenset(), timeout: float = 60) -> Any:  # type: ignore[assignment]
        def probe() -> Any:
            fresh = [
                p
                for p in self.pods(name)
                if p.metadata.name not in exclude
                and not p.metadata.deletion_timestamp
                and p.status.phase == "Pending"
            ]
            return fresh[0] if fresh else None

        return wait_for(f"a new pending pod of {name}", probe, timeout)

    # --- acting as the kubelet -------------------------------------------------------------

    def _set_pod_status(self, pod: Any, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(pod.metadata.name, self.ns, {"status": status})

    def pod_running(self, pod: Any) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._set_pod_status(
            pod,
            {
                "phase": "Running",
                "startTime": now,
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "graft/trainer:it",
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": now}},
                    }
                ],
            },
        )

    def pod_terminated(
        self, pod: Any, exit_code: int, reason: str = "Error", message: str = ""
    ) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": now,
            "finishedAt": now,
        }
        if message:
            terminated["message"] = message
        self._set_pod_status(
            pod,
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "graft/trainer:it",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            },
        )

    def pod_evicted(self, pod: Any) -> None:
        self._set_pod_status(
            pod,
            {
                "phase": "Failed",
                "reason": "Evicted",
                "message": "The node was low on resource: memory.",
            },
        )

    def assert_succeeded_on_first_attempt(self, name: str) -> None:
        """Succeeded, in its first pod, with the spec it has now and every condition settled."""
        obj = self.ftj(name)
        assert obj is not None, name
        status = obj["status"]
        assert status["attempts"] == 1 and status["completionTime"], status
        assert status["observedGeneration"] == obj["metadata"]["generation"]
        types = {c["type"]: c["status"] for c in status["conditions"]}
        assert types == {
            "Validated": "True",
            "Running": "False",
            "Succeeded": "True",
            "Failed": "False",
            "Suspended": "False",
        }, status["conditions"]

    def events(self, name: str) -> list[tuple[str, str]]:
        items = self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob"
        ).items
        return [(e.type, e.reason) for e in items]


def service_account_client(api_client: Any, namespace: str, account: str) -> Any:
    """An ApiClient authenticated as `account` (a 10-minute token from the TokenRequest API)."""
    from kubernetes import client

    token = (
        client.CoreV1Api(api_client)
        .create_namespaced_service_account_token(
            account,
            namespace,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
            ),
        )
        .status.token
    )
    cfg = client.Configuration()
    cfg.host = api_client.configuration.host
    cfg.ssl_ca_cert = api_client.configuration.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


@contextmanager
def operator_namespace(
    control_plane: Any, tmp_path: Path, **env: str
) -> Iterator[tuple[Operator, Cluster]]:
    """A fresh namespace, the CRDs applied, and a running operator watching that namespace."""
    from kubernetes import client

    control_plane.kubectl("apply", "-f", str(REPO / "crds"))
    ns = f"op-{uuid.uuid4().hex[:6]}"
    api = control_plane.api_client()
    cluster = Cluster(api, ns)
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    op = Operator(control_plane.kubeconfig, ns, tmp_path / "operator.log", **env)
    op.start()
    try:
        yield op, cluster
    except BaseException:
        sys.stderr.write(op.log.read_text()[-6000:] if op.log.exists() else "")
        raise
    finally:
        op.stop()
        cluster.core.delete_namespace(ns)
