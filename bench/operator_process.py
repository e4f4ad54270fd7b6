"""The operator as a child process of a benchmark: the cluster prepared, started on its own
metrics port, waited for, stopped; and the measurements read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kubectl(kubeconfig: str) -> list[str]:
    """The local cluster's kubectl (any kubectl on PATH otherwise) for `kubeconfig`."""
    local = Path.home() / ".cache/graft/k8s-v1.20.2/bin/kubectl"
    return [str(local) if local.exists() else "kubectl", f"--kubeconfig={kubeconfig}"]


def prepare(kubeconfig: str, namespaces: Iterable[str]) -> None:
    """The CRDs applied and fresh `namespaces` created."""
    kc = kubectl(kubeconfig)
    subprocess.run([*kc, "apply", "-f", str(REPO / "crds")], check=True, capture_output=True)
    for ns in namespaces:
        subprocess.run([*kc, "create", "namespace", ns], check=True, capture_output=True)


def delete_namespaces(kubeconfig: str, namespaces: Iterable[str]) -> None:
    for ns in namespaces:
        subprocess.run(
            [*kubectl(kubeconfig), "delete", "namespace", ns, "--wait=false"],
            check=False,
            capture_output=True,
        )


def start_operator(
    kubeconfig: str,
    namespace: str,
    port: int,
    python_args: Iterable[str] = (),
    **env: str,
) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m graft.controller` watching `namespace`, metrics on 127.0.0.1:`port`, its log in
    a temporary file; returns when /healthz answers (SystemExit naming the log if it does not)."""
    fd, log_name = tempfile.mkstemp(prefix=f"graft-operator-{namespace}-", suffix=".log")
    full_env = {
        **os.environ,
        "KUBECONFIG": kubeconfig,
        "GRAFT_WATCH_NAMESPACES": namespace,
        "GRAFT_LOG_FORMAT": "text",
        "GRAFT_METRICS_HOST": "127.0.0.1",
        "GRAFT_METRICS_PORT": str(port),
        "GRAFT_TRAINER_IMAGE": "graft/trainer:bench",
        **env,
    }
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *python_args, "-m", "graft.controller"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, log_name
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop_operator(proc)
                raise SystemExit(f"operator did not start; log: {log_name}") from None
            time.sleep(0.2)


def stop_operator(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def rss_mib(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_requests(port: int) -> dict[str, float]:
    """The operator's own count of API requests, `METHOD resource code` -> n."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("graft_api_requests_total{"):
            labels, value = line[len("graft_api_requests_total{") :].split("} ")
            fields = dict(part.split("=", 1) for part in labels.split(","))
            key = " ".join(fields[k].strip('"') for k in ("method", "resource", "code"))
            counts[key] = float(value)
    return counts
