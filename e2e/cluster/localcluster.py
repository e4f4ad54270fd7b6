#!/usr/bin/env python3
"""A real, local, loopback-only Kubernetes v1.20.2 cluster plus an S3 server (tests, demo).

    python e2e/cluster/localcluster.py up     [--mode control-plane|full] [--state-dir DIR]
    python e2e/cluster/localcluster.py down   [--state-dir DIR] [--keep-control-plane]
    python e2e/cluster/localcluster.py status [--state-dir DIR]
    python e2e/cluster/localcluster.py image-base | image-trainer | image-operator [--tag TAG]
    python e2e/cluster/localcluster.py image-trainer-cuda [--tag TAG]   (torch's CUDA build)
    python e2e/cluster/localcluster.py env    (prints `export ...` lines)

Modes:
  control-plane  etcd + kube-apiserver + kube-controller-manager + moto S3 (seconds from cache)
  full           the above + kube-scheduler + dockerd + kubelet + pause/base images

Every listener binds 127.0.0.1 and pods use hostNetwork (see README.md for why).
Build caches live under ~/.cache/graft (override: GRAFT_CACHE_DIR); runtime state under
/tmp/graft-cluster (override: GRAFT_CLUSTER_STATE_DIR or --state-dir).

Standard library only (the S3 bucket is created with boto3 when it is importable).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SCRIPTS = HERE / "scripts"
K8S_VERSION = "v1.20.2"
NODE_NAME = "localhost"  # resolves to 127.0.0.1, so the apiserver reaches the kubelet on loopback
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"
BASE_IMAGE = "local/debian-python:bookworm"
TRAINER_IMAGE = "graft/trainer:dev"
TRAINER_CUDA_IMAGE = "graft/trainer:dev-cuda"
OPERATOR_IMAGE = "graft/operator:dev"
# The exact versions both images install (tools/lock.py, `make lock`).
LOCK_FILE = "requirements.lock"
# image name -> (pyproject extra, Dockerfile, default tag, torch build: the Dockerfile's TORCH)
IMAGES = {
    "trainer": ("trainer", "trainer-image/Dockerfile", TRAINER_IMAGE, "cpu"),
    "trainer-cuda": ("trainer", "trainer-image/Dockerfile", TRAINER_CUDA_IMAGE, "cuda"),
    "operator": ("operator", "operator/Dockerfile", OPERATOR_IMAGE, None),
}
S3_BUCKET = "graft-artifacts"
S3_SECRET = "graft-s3"
S3_REGION = "us-east-1"
# Marker put into the environment of every process we start; `down` and the tests use it to
# prove nothing is left behind.
MARKER_ENV = "GRAFT_LOCALCLUSTER_STATE_DIR"
# The apiserver's audit log (JSON lines, audit.k8s.io/v1 Events) in the state dir: every request
# made with a ServiceAccount's token outside kube-system, at level Metadata (who, verb, resource,
# response code; no bodies). The tests read it to see which API calls the operator really makes.
AUDIT_LOG = "audit.log"
AUDIT_POLICY = "audit-policy.json"
AUDIT_LOG_MAX_MB = 50  # rotated at this size ...
AUDIT_LOG_MAX_BACKUPS = 1  # ... keeping one old file (audit-<time>.log beside it)

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "s3")
FULL_EXTRA = ("kube-scheduler", "dockerd", "kubelet")
MODES = {"control-plane": CONTROL_PLANE, "full": CONTROL_PLANE + FULL_EXTRA}
# Order in which components are stopped.
STOP_ORDER = (
    "kubelet",
    "kube-scheduler",
    "dockerd",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
    "s3",
)


def cache_dir() -> Path:
    return Path(os.environ.get("GRAFT_CACHE_DIR", Path.home() / ".cache" / "graft"))


def base_tarball() -> Path:
    # named by what build-base-rootfs.sh includes: a cached rootfs without tcmalloc is not reused
    return cache_dir() / "base" / "debian-python-tcmalloc-bookworm.tar"


def default_state_dir() -> Path:
    return Path(os.environ.get("GRAFT_CLUSTER_STATE_DIR", "/tmp/graft-cluster"))


def k8s_bin_dir() -> Path:
    return cache_dir() / f"k8s-{K8S_VERSION}" / "bin"


# --------------------------------------------------------------------------------------------
# Pure configuration (unit-tested)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ports:
    etcd_client: int = 2379
    etcd_peer: int = 2380
    apiserver: int = 6443
    controller_manager: int = 10257
    scheduler: int = 10259
    kubelet: int = 10250
    kubelet_healthz: int = 10248
    s3: int = 9555

    @classmethod
    def with_offset(cls, offset: int) -> Ports:
        base = cls()
        return cls(**{f.name: getattr(base, f.name) + offset for f in dataclasses.fields(cls)})


def ports_free(ports: Ports) -> bool:
    for port in dataclasses.astuple(ports):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def find_free_offset(start: int = 1000, stop: int = 2000, step: int = 20) -> int:
    """A port offset whose ports are all free on 127.0.0.1 (for a second, throwaway cluster).

    Multiples of 20 in [1000, 2000) never make one cluster's port equal another's."""
    import random

    offsets = list(range(start, stop, step))
    random.shuffle(offsets)
    for off in offsets:
        if ports_free(Ports.with_offset(off)):
            return off
    raise RuntimeError("no free port offset")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    state_dir: Path
    ports: Ports
    token: str
    s3_access_key: str = "graft-local"
    s3_secret_key: str = "graft-local-secret"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def docker_sock(self) -> Path:
        return self.state_dir / "docker.sock"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / AUDIT_LOG

    @property
    def audit_policy(self) -> Path:
        return self.state_dir / AUDIT_POLICY

    @property
    def docker_host(self) -> str:
        return f"unix://{self.docker_sock}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["state_dir"] = str(self.state_dir)
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterConfig:
        d = json.loads(text)
        d["state_dir"] = Path(d["state_dir"])
        d["ports"] = Ports(**d["ports"])
        return cls(**d)


def render_kubeconfig(cfg: ClusterConfig, ca_pem: bytes) -> str:
    import base64

    ca = base64.b64encode(ca_pem).decode()
    return f"""apiVersion: v1
kind: Config
clusters:
- name: graft-local
  cluster:
    server: https://127.0.0.1:{cfg.ports.apiserver}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {cfg.token}
contexts:
- name: graft-local
  context:
    cluster: graft-local
    user: admin
    namespace: default
current-context: graft-local
"""


def render_audit_policy() -> str:
    """The apiserver's audit policy (JSON is YAML): requests made as a ServiceAccount, except the
    controller-manager's own (kube-system, one account per controller), at level Metadata;
    nothing else. Only the ResponseStarted (watches) and ResponseComplete stages are written."""
    policy = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
            {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
            {"level": "None"},
        ],
    }
    return json.dumps(policy, indent=2) + "\n"


def render_kubelet_config(cfg: ClusterConfig) -> str:
    p = cfg.ports
    return f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {p.kubelet}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {p.kubelet_healthz}
cgroupDriver: cgroupfs
failSwapOn: false
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"""


def render_runc_wrapper(real_runc: str = "/usr/sbin/runc") -> str:
    """A runc wrapper that turns a negative oomScoreAdj into 0.

    The sandbox lacks CAP_SYS_RESOURCE, so runc cannot lower oom_score_adj (the kubelet asks
    for -998 on the pause container) and fails with "can't get final child's PID from pipe".
    """
    return f"""#!/bin/sh
# Generated by e2e/cluster/localcluster.py. Rewrites a negative .process.oomScoreAdj in the
# bundle's config.json to 0, then runs the real runc with the same arguments.
bundle=""
prev=""
for a in "$@"; do
  case "$a" in
    --bundle=*) bundle="${{a#--bundle=}}" ;;
    -b=*) bundle="${{a#-b=}}" ;;
  esac
  if [ "$prev" = "--bundle" ] || [ "$prev" = "-b" ]; then bundle="$a"; fi
  prev="$a"
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  if jq -e '(.process.oomScoreAdj // 0) < 0' "$bundle/config.json" >/dev/null 2>&1; then
    tmp="$bundle/config.json.graft-tmp"
    jq -c '.process.oomScoreAdj = 0' "$bundle/config.json" > "$tmp" \\
      && mv "$tmp" "$bundle/config.json"
  fi
fi
exec {real_runc} "$@"
"""


def component_commands(cfg: ClusterConfig, bin_dir: Path, wrapper: Path) -> dict[str, list[str]]:
    """The command line of every component (all listeners on 127.0.0.1)."""
    s, p, pki = cfg.state_dir, cfg.ports, cfg.pki
    kc = str(cfg.kubeconfig)
    return {
        "etcd": [
            "/usr/bin/etcd",
            "--name",
            "graft",
            "--data-dir",
            str(s / "etcd"),
            "--listen-client-urls",
            f"http://127.0.0.1:{p.etcd_client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{p.etcd_client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{p.etcd_peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{p.etcd_peer}",
            "--initial-cluster",
            f"graft=http://127.0.0.1:{p.etcd_peer}",
        ],
        "kube-apiserver": [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p.apiserver}",
            "--insecure-port=0",
            "--advertise-address=127.0.0.1",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={s / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--kubelet-preferred-address-types=Hostname",
            "--endpoint-reconciler-type=none",
            f"--audit-policy-file={cfg.audit_policy}",
            f"--audit-log-path={cfg.audit_log}",
            f"--audit-log-maxsize={AUDIT_LOG_MAX_MB}",
            f"--audit-log-maxbackup={AUDIT_LOG_MAX_BACKUPS}",
        ],
        "kube-controller-manager": [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service,-route",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--port=0",
            f"--secure-port={p.controller_manager}",
            f"--cert-dir={s / 'controller-manager-certs'}",
        ],
        "kube-scheduler": [
            str(bin_dir / "kube-scheduler"),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--port=0",
            f"--secure-port={p.scheduler}",
            f"--cert-dir={s / 'scheduler-certs'}",
        ],
        "dockerd": [
            "/usr/sbin/dockerd",
            f"--host={cfg.docker_host}",
            f"--data-root={cache_dir() / 'docker'}",
            f"--exec-root={s / 'docker-exec'}",
            f"--pidfile={s / 'docker-internal.pid'}",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            f"--add-runtime=nooom={wrapper}",
            "--default-runtime=nooom",
            "--storage-driver=overlay2",
        ],
        "kubelet": [
            str(bin_dir / "kubelet"),
            f"--kubeconfig={kc}",
            f"--config={s / 'kubelet-config.yaml'}",
            f"--root-dir={s / 'kubelet'}",
            f"--cert-dir={s / 'kubelet' / 'pki'}",
            "--container-runtime=docker",
            f"--docker-endpoint={cfg.docker_host}",
            f"--container-runtime-endpoint=unix://{s / 'dockershim.sock'}",
            f"--pod-infra-container-image={PAUSE_IMAGE}",
            f"--hostname-override={NODE_NAME}",
        ],
        "s3": [
            str(Path(sys.executable).parent / "moto_server"),
            "-H",
            "127.0.0.1",
            "-p",
            str(p.s3),
        ],
    }


def s3_env(cfg: ClusterConfig) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": cfg.s3_endpoint,
        "AWS_ACCESS_KEY_ID": cfg.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": cfg.s3_secret_key,
        "AWS_REGION": S3_REGION,
        "AWS_DEFAULT_REGION": S3_REGION,
        "GRAFT_ARTIFACT_BUCKET": S3_BUCKET,
    }


def trainer_requirements(pyproject_text: str, extra: str = "trainer") -> list[str]:
    """The requirement set of an image, as its Dockerfile computes it: core dependencies + one
    extra (`trainer`, `operator`) + the build's own requirements (setuptools)."""
    import tomllib

    doc = tomllib.loads(pyproject_text)
    proj = doc["project"]
    reqs = list(proj.get("dependencies", [])) + list(
        proj.get("optional-dependencies", {}).get(extra, [])
    )
    return sorted(set(reqs + list(doc.get("build-system", {}).get("requires", []))))


def wheelhouse_key(
    reqs: list[str], python: str = "3.11", lock: str = "", torch: str | None = "cpu"
) -> str:
    """The wheelhouse's cache key: the requirements, the lock's text and torch's build."""
    text = "\n".join(sorted(reqs)) + f"\npy{python}\nlinux-x86_64\ntorch:{torch}\n{lock}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Process bookkeeping (PID + start time, so a recycled PID is never signalled)
# --------------------------------------------------------------------------------------------


def proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces/parens: fields after the last ')'
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] == "Z":  # zombie: as good as gone
        return None
    return int(rest[19])


def read_pidfile(path: Path) -> tuple[int, int] | None:
    try:
        pid_s, st_s = path.read_text().split()
        return int(pid_s), int(st_s)
    except (OSError, ValueError):
        return None


def pid_alive(path: Path) -> int | None:
    rec = read_pidfile(path)
    if rec is None:
        return None
    pid, st = rec
    return pid if proc_starttime(pid) == st else None


def processes_with_marker(state_dir: Path) -> list[int]:
    """PIDs whose environment carries our marker for this state dir."""
    needle = f"{MARKER_ENV}={state_dir.resolve()}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and proc_starttime(int(d.name)) is not None:
            found.append(int(d.name))
    return found


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------


class StepFailed(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


def tail(path: Path | None, n: int = 40) -> str:
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return "\n".join("    | " + line for line in lines)


@contextlib.contextmanager
def step(name: str, logfile: Path | None = None) -> Iterator[None]:
    log(f"==> {name}")
    t0 = time.monotonic()
    try:
        yield
    except Exception as e:
        log(f"!!! step failed: {name} ({time.monotonic() - t0:.1f}s): {e}")
        if logfile is not None:
            log(f"    last lines of {logfile}:\n{tail(logfile)}")
        raise StepFailed(name) from e
    log(f"    {name}: done in {time.monotonic() - t0:.1f}s")


def run(
    cmd: list[str],
    logfile: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    **kw,
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("ab") as f:
            f.write(f"\n$ {' '.join(cmd)}\n".encode())
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, **kw)
    else:
        r = subprocess.run(cmd, env=full_env, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}")
    return r


def wait_for(
    what: str, probe, timeout: float, interval: float = 0.3, pidfile: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except Exception as e:
            last = e
        if pidfile is not None and pid_alive(pidfile) is None:
            raise RuntimeError(f"{what}: process exited")
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


class LocalCluster:
    def __init__(self, state_dir: Path | None = None, port_offset: int = 0):
        self.state_dir = (state_dir or default_state_dir()).resolve()
        self.port_offset = port_offset
        self._cfg: ClusterConfig | None = None
        self._debootstrap: subprocess.Popen[bytes] | None = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize up/down on one state dir (several sessions may share a machine)."""
        lock = self.state_dir.parent / f".{self.state_dir.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"waiting for another up/down on {self.state_dir} ({lock})")
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- users (test sessions) --
    def users_dir(self) -> Path:
        return self.state_dir / "users"

    def add_user(self, pid: int) -> None:
        self.users_dir().mkdir(parents=True, exist_ok=True)
        (self.users_dir() / f"{pid}.pid").write_text(f"{pid} {proc_starttime(pid)}\n")

    def remove_user(self, pid: int) -> None:
        (self.users_dir() / f"{pid}.pid").unlink(missing_ok=True)

    def live_users(self) -> list[int]:
        if not self.users_dir().is_dir():
            return []
        return [p for f in self.users_dir().glob("*.pid") if (p := pid_alive(f)) is not None]

    # -- paths --
    def pidfile(self, comp: str) -> Path:
        return self.state_dir / "pids" / f"{comp}.pid"

    def logfile(self, comp: str) -> Path:
        return self.state_dir / "logs" / f"{comp}.log"

    @property
    def cfg(self) -> ClusterConfig:
        if self._cfg is None:
            p = self.state_dir / "config.json"
            if p.exists():
                self._cfg = ClusterConfig.from_json(p.read_text())
            else:
                self._cfg = ClusterConfig(
                    self.state_dir, Ports.with_offset(self.port_offset), secrets.token_hex(16)
                )
        return self._cfg

    def running(self) -> dict[str, int | None]:
        return {c: pid_alive(self.pidfile(c)) for c in STOP_ORDER}

    def current_mode(self) -> str | None:
        up = {c for c, pid in self.running().items() if pid}
        if up >= set(MODES["full"]):
            return "full"
        if up >= set(MODES["control-plane"]):
            return "control-plane"
        return None

    # -- health probes --
    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cfg.pki / "ca.crt"))

    def api_get(self, path: str, timeout: float = 3) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"https://127.0.0.1:{self.cfg.ports.apiserver}{path}",
            headers={"Authorization": f"Bearer {self.cfg.token}"},
        )
        try:
            with urllib.request.urlopen(req, context=self._ssl(), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def apiserver_ready(self) -> bool:
        return self.api_get("/readyz")[0] == 200

    def node_ready(self) -> bool:
        code, body = self.api_get(f"/api/v1/nodes/{NODE_NAME}")
        if code != 200:
            return False
        conds = json.loads(body).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    def s3_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.cfg.s3_endpoint + "/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True

    def healthy(self, mode: str) -> bool:
        try:
            ok = self.apiserver_ready() and self.s3_ready()
            if mode == "full":
                ok = ok and self.node_ready()
            return ok
        except Exception:
            return False

    # -- lifecycle --
    def start_process(self, comp: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        self.logfile(comp).parent.mkdir(parents=True, exist_ok=True)
        self.pidfile(comp).parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **(env or {}), MARKER_ENV: str(self.state_dir)}
        full_env.pop("KUBECONFIG", None)
        with self.logfile(comp).open("ab") as f, open(os.devnull, "rb") as devnull:
            f.write(f"\n$ {' '.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=devnull,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
                cwd=self.state_dir,
            )
        st = None
        for _ in range(50):
            st = proc_starttime(proc.pid)
            if st is not None:
                break
            time.sleep(0.01)
        if st is None:
            raise RuntimeError(f"{comp} exited immediately")
        self.pidfile(comp).write_text(f"{proc.pid} {st}\n")
        return proc.pid

    def up(self, mode: str = "full") -> None:
        t_total = time.monotonic()
        MODES[mode]
        running = self.running()
        alive = {c for c, pid in running.items() if pid}
        cur = self.current_mode()
        log(f"graft local cluster: up --mode {mode} (state dir {self.state_dir})")
        if alive and (cur is None or not self.healthy(cur)):
            log(f"found a half-started cluster (running: {sorted(alive)}); cleaning it up")
            self.down()
            alive = set()
        if not alive:
            self._fresh_state()
        self.ensure_debs(mode)
        if mode == "full" and not base_tarball().exists():
            self._start_debootstrap_in_background()
        self.ensure_k8s_binaries()
        if "etcd" not in alive:
            self._start_control_plane()
        if mode == "full":
            self._start_node(alive)
        self._write_env_files()
        log(f"cluster up ({mode}) in {time.monotonic() - t_total:.1f}s total")
        log(f"    export KUBECONFIG={self.cfg.kubeconfig}")
        log(f"    source {self.state_dir / 's3.env'}   # S3 endpoint, credentials, bucket")

    def _start_debootstrap_in_background(self) -> None:
        """Cold machine: debootstrap (network bound) runs while Go compiles (CPU bound)."""
        lf = cache_dir() / "logs" / "debootstrap.log"
        lf.parent.mkdir(parents=True, exist_ok=True)
        base_tarball().parent.mkdir(parents=True, exist_ok=True)
        log(f"==> debootstrap of the base rootfs started in the background (log {lf})")
        with lf.open("ab") as f:
            self._debootstrap = subprocess.Popen(
                ["bash", str(SCRIPTS / "build-base-rootfs.sh"), str(base_tarball())],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _fresh_state(self) -> None:
        with step("prepare a fresh state dir"):
            self._unmount_below(self.state_dir)
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            self.state_dir.mkdir(parents=True)
            self._cfg = None
            cfg = self.cfg
            (self.state_dir / "config.json").write_text(cfg.to_json())
            self._make_pki()
            (self.state_dir / "tokens.csv").write_text(
                f'{cfg.token},admin,admin,"system:masters"\n'
            )
            os.chmod(self.state_dir / "tokens.csv", 0o600)
            ca = (cfg.pki / "ca.crt").read_bytes()
            cfg.kubeconfig.write_text(render_kubeconfig(cfg, ca))
            os.chmod(cfg.kubeconfig, 0o600)

    def _make_pki(self) -> None:
        pki = self.cfg.pki
        pki.mkdir(parents=True)
        lf = self.state_dir / "logs" / "pki.log"
        o = ["openssl"]
        run([*o, "genrsa", "-out", str(pki / "ca.key"), "2048"], lf)
        run(
            [
                *o,
                "req",
                "-x509",
                "-new",
                "-key",
                str(pki / "ca.key"),
                "-days",
                "3650",
                "-subj",
                "/CN=graft-local-ca",
                "-out",
                str(pki / "ca.crt"),
            ],
            lf,
        )
        run([*o, "genrsa", "-out", str(pki / "apiserver.key"), "2048"], lf)
        ext = pki / "apiserver.ext"
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            "extendedKeyUsage=serverAuth\n"
        )
        run(
            [
                *o,
                "req",
                "-new",
                "-key",
                str(pki / "apiserver.key"),
                "-subj",
                "/CN=kube-apiserver",
                "-out",
                str(pki / "apiserver.csr"),
            ],
            lf,
        )
        run(
            [
                *o,
                "x509",
                "-req",
                "-in",
                str(pki / "apiserver.csr"),
                "-CA",
                str(pki / "ca.crt"),
                "-CAkey",
                str(pki / "ca.key"),
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                str(ext),
                "-out",
                str(pki / "apiserver.crt"),
            ],
            lf,
        )
        run([*o, "genrsa", "-out", str(pki / "sa.key"), "2048"], lf)
        run([*o, "rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")], lf)

    def ensure_debs(self, mode: str) -> None:
        need = ["/usr/bin/etcd", "/usr/bin/openssl"]
        if mode == "full":
            need += ["/usr/sbin/dockerd", "/usr/sbin/runc", "/usr/bin/jq"]
        if all(Path(p).exists() for p in need) and k8s_bin_dir().joinpath("kubelet").exists():
            return
        lf = cache_dir() / "logs" / "install-debs.log"
        with step("install Debian packages (apt)", lf):
            run(["bash", str(SCRIPTS / "install-debs.sh")], lf)

    def ensure_k8s_binaries(self) -> None:
        out = k8s_bin_dir().parent
        bins = [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kubectl",
            "pause",
        ]
        if all((out / "bin" / b).exists() for b in bins):
            log(f"==> kubernetes {K8S_VERSION} binaries: cached in {out / 'bin'}")
            return
        lf = cache_dir() / "logs" / "build-k8s.log"
        with step(
            f"build kubernetes {K8S_VERSION} from Debian's source package "
            f"(~6 min on 2 cores; log {lf})",
            lf,
        ):
            run(["bash", str(SCRIPTS / "build-k8s.sh"), str(out)], lf)

    def _start_control_plane(self) -> None:
        cmds = component_commands(self.cfg, k8s_bin_dir(), self._wrapper_path())
        self._start_etcd(cmds)
        with step("start S3 server (moto)", self.logfile("s3")):
            self.start_process("s3", cmds["s3"])
            wait_for("S3 server", self.s3_ready, 30, pidfile=self.pidfile("s3"))
            self._create_bucket()
        self._start_api_server(cmds)
        with step("start kube-controller-manager", self.logfile("kube-controller-manager")):
            self.start_process("kube-controller-manager", cmds["kube-controller-manager"])
            wait_for(
                "default service account",
                lambda: (
                    self.api_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
                ),
                60,
                pidfile=self.pidfile("kube-controller-manager"),
            )
        with step("create the S3 Secret in the cluster"):
            self._apply_s3_secret()

    def _start_etcd(self, cmds: dict[str, list[str]]) -> None:
        with step("start etcd", self.logfile("etcd")):
            self.start_process("etcd", cmds["etcd"])
            wait_for(
                "etcd health",
                lambda: (
                    urllib.request.urlopen(
                        f"http://127.0.0.1:{self.cfg.ports.etcd_client}/health", timeout=2
                    ).status
                    == 200
                ),
                30,
                pidfile=self.pidfile("etcd"),
            )

    def _start_api_server(self, cmds: dict[str, list[str]]) -> None:
        with step("start kube-apiserver", self.logfile("kube-apiserver")):
            self.cfg.audit_policy.write_text(render_audit_policy())
            self.start_process("kube-apiserver", cmds["kube-apiserver"])
            wait_for(
                "apiserver /readyz",
                self.apiserver_ready,
                90,
                pidfile=self.pidfile("kube-apiserver"),
            )

    def restart_api_server(self, down_seconds: float = 0.0) -> None:
        """Stop kube-apiserver and etcd (an API outage: control-plane upgrade, a node of the
        control plane lost), keep them down `down_seconds`, start them again and wait until the
        API answers. For fault tests; every other component keeps running."""
        cmds = component_commands(self.cfg, k8s_bin_dir(), self._wrapper_path())
        with step("stop kube-apiserver and etcd"):
            self._stop("kube-apiserver")
            self._stop("etcd")
        time.sleep(down_seconds)
        self._start_etcd(cmds)
        self._start_api_server(cmds)

    def _start_node(self, alive: set[str]) -> None:
        cfg = self.cfg
        cmds = component_commands(cfg, k8s_bin_dir(), self._wrapper_path())
        if "kube-scheduler" not in alive:
            with step("start kube-scheduler", self.logfile("kube-scheduler")):
                self.start_process("kube-scheduler", cmds["kube-scheduler"])
        if "dockerd" not in alive:
            with step("start dockerd (runtime nooom, --bridge=none)", self.logfile("dockerd")):
                self._wrapper_path().write_text(render_runc_wrapper())
                os.chmod(self._wrapper_path(), 0o755)
                self.start_process("dockerd", cmds["dockerd"])
                wait_for(
                    "docker socket",
                    lambda: self.docker(["version"], check=False, capture=True).returncode == 0,
                    60,
                    pidfile=self.pidfile("dockerd"),
                )
        with step("pause image", self.logfile("images")):
            self.ensure_pause_image()
        with step("base image", cache_dir() / "logs" / "debootstrap.log"):
            self.ensure_base_image()
        if "kubelet" not in alive:
            with step("start kubelet", self.logfile("kubelet")):
                (cfg.state_dir / "kubelet-config.yaml").write_text(render_kubelet_config(cfg))
                (cfg.state_dir / "kubelet").mkdir(exist_ok=True)
                self.start_process("kubelet", cmds["kubelet"])
            with step("wait for node Ready", self.logfile("kubelet")):
                wait_for(
                    f"node {NODE_NAME} Ready", self.node_ready, 120, pidfile=self.pidfile("kubelet")
                )

    def _wrapper_path(self) -> Path:
        return self.state_dir / "runc-nooom"

    def docker(
        self,
        args: list[str],
        check: bool = True,
        capture: bool = False,
        logfile: Path | None = None,
        **kw,
    ) -> subprocess.CompletedProcess:
        cmd = ["docker", "-H", self.cfg.docker_host, *args]
        env = {**os.environ, "DOCKER_HOST": self.cfg.docker_host, "DOCKER_BUILDKIT": "0"}
        if capture:
            r = subprocess.run(cmd, capture_output=True, env=env, **kw)
            if check and r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.decode(errors='replace')}")
            return r
        return run(cmd, logfile, env=env, check=check, **kw)

    def image_exists(self, tag: str) -> bool:
        return self.docker(["image", "inspect", tag], check=False, capture=True).returncode == 0

    def ensure_pause_image(self) -> None:
        if self.image_exists(PAUSE_IMAGE):
            log(f"    {PAUSE_IMAGE}: present")
            return
        pause = k8s_bin_dir() / "pause"
        tarball = self.state_dir / "pause.tar"
        subprocess.run(["tar", "-C", str(pause.parent), "-cf", str(tarball), "pause"], check=True)
        with tarball.open("rb") as f:
            self.docker(
                ["import", "-c", 'ENTRYPOINT ["/pause"]', "-", PAUSE_IMAGE],
                logfile=self.logfile("images"),
                stdin=f,
            )
        tarball.unlink()

    def ensure_base_image(self) -> None:
        if self.image_exists(BASE_IMAGE):
            log(f"    {BASE_IMAGE}: present")
            return
        tarball = base_tarball()
        bg = self._debootstrap
        if bg is not None:
            log("    waiting for the background debootstrap")
            if bg.wait() != 0:
                raise RuntimeError("debootstrap failed (see ~/.cache/graft/logs/debootstrap.log)")
            self._debootstrap = None
        if not tarball.exists():
            tarball.parent.mkdir(parents=True, exist_ok=True)
            log("    debootstrap bookworm (python3) -> cached rootfs tarball (~3 min cold)")
            run(
                ["bash", str(SCRIPTS / "build-base-rootfs.sh"), str(tarball)],
                cache_dir() / "logs" / "debootstrap.log",
            )
        with tarball.open("rb") as f:
            self.docker(["import", "-", BASE_IMAGE], logfile=self.logfile("images"), stdin=f)

    def _create_bucket(self) -> None:
        try:
            import boto3
        except ImportError:
            # stdlib fallback: moto accepts unsigned requests
            req = urllib.request.Request(f"{self.cfg.s3_endpoint}/{S3_BUCKET}", method="PUT")
            urllib.request.urlopen(req, timeout=10).read()
            return
        env = s3_env(self.cfg)
        c = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name=S3_REGION,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        c.create_bucket(Bucket=S3_BUCKET)

    def kubectl(
        self, args: list[str], input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        cmd = [str(k8s_bin_dir() / "kubectl"), f"--kubeconfig={self.cfg.kubeconfig}", *args]
        r = subprocess.run(cmd, input=input, capture_output=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.decode(errors='replace')}")
        return r

    def _apply_s3_secret(self) -> None:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": S3_SECRET, "namespace": "default"},
            "stringData": s3_env(self.cfg),
        }
        self.kubectl(["apply", "-f", "-"], input=json.dumps(secret).encode())

    def _write_env_files(self) -> None:
        env = s3_env(self.cfg)
        (self.state_dir / "s3.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
        (self.state_dir / "cluster.env").write_text(
            f"export KUBECONFIG={self.cfg.kubeconfig}\n"
            f"export DOCKER_HOST={self.cfg.docker_host}\n"
            f"export PATH={k8s_bin_dir()}:$PATH\n"
        )

    # -- down --
    def down(self, keep_control_plane: bool = False) -> list[int]:
        """Stop what `up` started, by PID. Returns PIDs that are still alive (should be [])."""
        t0 = time.monotonic()
        comps = [c for c in STOP_ORDER if not keep_control_plane or c in FULL_EXTRA]
        if not self.state_dir.exists():
            log(f"no cluster state in {self.state_dir}: nothing to stop")
            return []
        log(f"graft local cluster: down (state dir {self.state_dir})")
        if "dockerd" in comps and pid_alive(self.pidfile("dockerd")):
            if pid_alive(self.pidfile("kubelet")):
                self._stop("kubelet")
            with step("remove pod containers"):
                r = self.docker(["ps", "-aq"], check=False, capture=True, timeout=30)
                ids = r.stdout.decode().split()
                if ids:
                    self.docker(["rm", "-f", *ids], check=False, capture=True, timeout=120)
        for comp in comps:
            self._stop(comp)
        self._unmount_below(self.state_dir / "kubelet")
        self._unmount_below(self.state_dir / "docker-exec")
        left = [] if keep_control_plane else processes_with_marker(self.state_dir)
        if left:
            log(f"!!! processes still carrying the marker: {left}; sending SIGKILL")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            left = processes_with_marker(self.state_dir)
        log(
            f"cluster {'node stopped' if keep_control_plane else 'down'} in "
            f"{time.monotonic() - t0:.1f}s" + (f"; STILL ALIVE: {left}" if left else "")
        )
        return left

    def _stop(self, comp: str, timeout: float = 20) -> None:
        pf = self.pidfile(comp)
        pid = pid_alive(pf)
        if pid is None:
            pf.unlink(missing_ok=True)
            return
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while pid_alive(pf) and time.monotonic() - t0 < timeout:
            time.sleep(0.1)
        if pid_alive(pf):
            log(f"    {comp} (pid {pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pf) and time.monotonic() - t0 < timeout + 5:
                time.sleep(0.1)
        log(f"    stopped {comp} (pid {pid}) in {time.monotonic() - t0:.1f}s")
        pf.unlink(missing_ok=True)

    @staticmethod
    def _unmount_below(root: Path) -> None:
        root = root.resolve() if root.exists() else root
        prefix = str(root).rstrip("/") + "/"
        try:
            lines = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return
        mounts = []
        for line in lines:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp.startswith(prefix) or mp == str(root):
                mounts.append(mp)
        for mp in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], check=False, capture_output=True)

    # -- status --
    def status(self) -> int:
        running = self.running()
        mode = self.current_mode()
        log(f"state dir: {self.state_dir}")
        for comp in STOP_ORDER:
            pid = running[comp]
            log(f"  {comp:<24} {'running pid ' + str(pid) if pid else 'stopped'}")
        if mode is None:
            log("cluster: DOWN" + (" (partially running)" if any(running.values()) else ""))
            return 1
        healthy = self.healthy(mode)
        log(f"cluster: UP mode={mode} healthy={healthy}")
        if healthy:
            log(f"  KUBECONFIG={self.cfg.kubeconfig}")
            log(f"  S3 endpoint={self.cfg.s3_endpoint} bucket={S3_BUCKET}")
        return 0 if healthy else 2

    # -- images --
    def require_docker(self) -> None:
        if pid_alive(self.pidfile("dockerd")) is None:
            raise SystemExit("dockerd is not running: run `make cluster-up` (full mode) first")

    def build_trainer_image(self, tag: str = TRAINER_IMAGE) -> None:
        self.build_image("trainer", tag)

    def build_image(self, name: str, tag: str | None = None) -> None:
        """Build the trainer (CPU or CUDA torch) or operator image on the local base image,
        offline: the wheels are fetched on this machine at the lock's versions."""
        extra, dockerfile, default_tag, torch = IMAGES[name]
        tag = tag or default_tag
        t0 = time.monotonic()
        self.require_docker()
        with step("base image", cache_dir() / "logs" / "debootstrap.log"):
            self.ensure_base_image()
        reqs = trainer_requirements((REPO / "pyproject.toml").read_text(), extra)
        lock = (REPO / LOCK_FILE).read_text()
        wh = cache_dir() / "wheelhouse" / wheelhouse_key(reqs, lock=lock, torch=torch)
        lf = cache_dir() / "logs" / "wheelhouse.log"
        with step(f"wheelhouse ({len(reqs)} requirements, torch {torch}) in {wh}", lf):
            ensure_wheelhouse(reqs, wh, lf, torch=torch)
        ctx = cache_dir() / f"{name}-context"
        with step("assemble build context"):
            assemble_context(ctx, wh)
        with step(f"docker build {tag} (FROM {BASE_IMAGE})", self.logfile(f"image-{name}")):
            self.docker(
                [
                    "build",
                    "--network",
                    "host",
                    "-f",
                    str(ctx / dockerfile),
                    "--build-arg",
                    f"BASE_IMAGE={BASE_IMAGE}",
                    "--build-arg",
                    "WHEELHOUSE=wheelhouse",
                    *(["--build-arg", f"TORCH={torch}"] if torch else []),
                    "-t",
                    tag,
                    str(ctx),
                ],
                logfile=self.logfile(f"image-{name}"),
            )
        log(f"{name} image {tag} built in {time.monotonic() - t0:.1f}s")


def find_links() -> list[str]:
    """pip's configured find-links folders (read at run time, never hardcoded)."""
    val = os.environ.get("PIP_FIND_LINKS", "")
    if not val:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            r = subprocess.run(
                ["pip", "config", "get", "global.find-links"], capture_output=True, text=True
            )
        val = r.stdout.strip() if r.returncode == 0 else ""
    return val.split()


def ensure_wheelhouse(reqs: list[str], wh: Path, logfile: Path, torch: str | None = "cpu") -> None:
    """The wheels of `reqs` at the lock's versions. torch `cpu`: pip's find-links folders (where
    these machines keep the CPU build) are searched too; `cuda`: the index alone."""
    if (wh / ".complete").exists():
        log(f"    cached: {len(list(wh.glob('*.whl')))} wheels")
        return
    wh.mkdir(parents=True, exist_ok=True)
    (wh / "requirements.in").write_text("\n".join(reqs) + "\n")
    fl = find_links() if torch != "cuda" else []
    lock = ["-c", str(REPO / LOCK_FILE)]
    pinned = wh / "requirements.txt"
    uv = shutil.which("uv")
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
        pip = ["python3", "-m", "pip"]
    fl_args = [a for d in fl for a in ("--find-links", d)]
    if uv:
        # pip's resolver takes >10 min on this set; uv resolves it in seconds.
        run(
            [
                uv,
                "pip",
                "compile",
                "--quiet",
                "--python-version",
                "3.11",
                "--python-platform",
                "x86_64-manylinux_2_28",
                *fl_args,
                *lock,
                str(wh / "requirements.in"),
                "-o",
                str(pinned),
            ],
            logfile,
        )
        if torch == "cuda":
            # pip reads its configured find-links whatever we pass, and `torch==2.13.0` also
            # matches a CPU `2.13.0+cpu` found there; `===` matches the index's build only.
            text = pinned.read_text()
            pinned.write_text(re.sub(r"(?m)^torch==", "torch===", text))
        # `pip wheel` downloads wheels and builds the few sdist-only packages (rouge-score).
        wheel = [*pip, "wheel", "--no-deps", "--no-cache-dir", "-w", str(wh), *fl_args]
        run([*wheel, "-r", str(pinned)], logfile)
    else:
        run(
            [*pip, "wheel", "-w", str(wh), *fl_args, *lock, "-r", str(wh / "requirements.in")],
            logfile,
        )
    (wh / ".complete").write_text("ok\n")
    log(f"    downloaded {len(list(wh.glob('*.whl')))} wheels")


# What the Dockerfiles COPY from the repository.
CONTEXT_ITEMS = ("pyproject.toml", LOCK_FILE, "README.md", "operator", "trainer-image")


def assemble_context(ctx: Path, wh: Path) -> None:
    """A build context = the project's files + the wheelhouse (hard links, no copies)."""
    ctx.mkdir(parents=True, exist_ok=True)
    excl = ["--exclude=__pycache__", "--exclude=*.pyc", "--exclude=*.egg-info"]
    for item in CONTEXT_ITEMS:
        src = REPO / item
        if src.is_dir():
            run(["rsync", "-a", "--delete", *excl, f"{src}/", f"{ctx / item}/"])
        elif src.exists():
            run(["rsync", "-a", str(src), str(ctx / item)])
    whc = ctx / "wheelhouse"
    marker = whc / ".source"
    if not (marker.exists() and marker.read_text() == str(wh)):
        if whc.exists():
            shutil.rmtree(whc)
        whc.mkdir()
        for f in wh.glob("*.whl"):
            try:
                os.link(f, whc / f.name)
            except OSError:
                shutil.copy2(f, whc / f.name)
        marker.write_text(str(wh))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "command",
        choices=[
            "up",
            "down",
            "status",
            "image-base",
            "image-trainer",
            "image-trainer-cuda",
            "image-operator",
            "env",
        ],
    )
    ap.add_argument("--mode", choices=list(MODES), default="full")
    ap.add_argument("--state-dir", type=Path, default=None)
    ap.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="shift every port (for a second cluster next to the default one)",
    )
    ap.add_argument(
        "--keep-control-plane",
        action="store_true",
        help="down: stop only scheduler, dockerd and kubelet",
    )
    ap.add_argument("--tag", default=None, help="image tag (default: graft/<name>:dev)")
    a = ap.parse_args(argv)
    c = LocalCluster(a.state_dir, a.port_offset)
    try:
        if a.command == "up":
            with c.locked():
                c.up(a.mode)
        elif a.command == "down":
            with c.locked():
                return 1 if c.down(a.keep_control_plane) else 0
        elif a.command == "status":
            return c.status()
        elif a.command == "image-base":
            c.require_docker()
            with step("base image", cache_dir() / "logs" / "debootstrap.log"):
                c.ensure_base_image()
        elif a.command in ("image-trainer", "image-trainer-cuda", "image-operator"):
            c.build_image(a.command.removeprefix("image-"), a.tag)
        elif a.command == "env":
            for f in ("cluster.env", "s3.env"):
                p = c.state_dir / f
                if p.exists():
                    sys.stdout.write(p.read_text())
    except StepFailed as e:
        log(f"FAILED at step: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
