"""Pure configuration logic of e2e/cluster/localcluster.py."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import yaml

from tests.fixtures.cluster import load_localcluster

lc = load_localcluster()


def _cfg(tmp_path: Path, offset: int = 0):
    return lc.ClusterConfig(tmp_path, lc.Ports.with_offset(offset), "tok123")


def test_ports_offset_shifts_every_port() -> None:
    base, shifted = lc.Ports(), lc.Ports.with_offset(100)
    for name, value in vars(base).items():
        assert getattr(shifted, name) == value + 100
    assert len(set(vars(base).values())) == len(vars(base))  # no clashes


def test_config_json_roundtrip(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, 7)
    assert lc.ClusterConfig.from_json(cfg.to_json()) == cfg


def test_every_listener_is_loopback(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cmds = lc.component_commands(cfg, Path("/bins"), tmp_path / "wrapper")
    assert set(cmds) == set(lc.MODES["full"])
    text = " ".join(" ".join(c) for c in cmds.values())
    # every URL / address we pass is 127.0.0.1 or a unix socket
    for url in re.findall(r"https?://([^:/ ]+)", text):
        assert url in ("127.0.0.1", "kubernetes.default.svc"), url
    assert "--bind-address=127.0.0.1" in cmds["kube-apiserver"]
    assert "--insecure-port=0" in cmds["kube-apiserver"]
    assert "--bind-address=127.0.0.1" in cmds["kube-controller-manager"]
    assert "--port=0" in cmds["kube-scheduler"]
    assert cmds["s3"][-4:] == ["-H", "127.0.0.1", "-p", str(cfg.ports.s3)]
    assert f"--host=unix://{tmp_path / 'docker.sock'}" in cmds["dockerd"]
    for flag in ("--bridge=none", "--iptables=false", "--default-runtime=nooom"):
        assert flag in cmds["dockerd"]
    kubelet_cfg = yaml.safe_load(lc.render_kubelet_config(cfg))
    assert kubelet_cfg["address"] == "127.0.0.1"
    assert kubelet_cfg["healthzBindAddress"] == "127.0.0.1"
    assert kubelet_cfg["readOnlyPort"] == 0
    assert kubelet_cfg["authorization"]["mode"] == "AlwaysAllow"


def test_no_private_range_address_is_ever_a_target(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cmds = lc.component_commands(cfg, Path("/bins"), tmp_path / "wrapper")
    for args in cmds.values():
        for arg in args:
            for ip in re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", arg):
                addr = ipaddress.ip_address(ip)
                if addr.is_loopback:
                    continue
                # the only non-loopback address is the service CIDR the apiserver must be
                # given; nothing connects to it
                assert arg == "--service-cluster-ip-range=10.0.0.0/24", arg


def test_kubeconfig_points_at_loopback(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    kc = yaml.safe_load(lc.render_kubeconfig(cfg, b"-----BEGIN CERTIFICATE-----\n"))
    assert kc["clusters"][0]["cluster"]["server"] == f"https://127.0.0.1:{cfg.ports.apiserver}"
    assert kc["users"][0]["user"]["token"] == "tok123"
    assert "insecure-skip-tls-verify" not in kc["clusters"][0]["cluster"]


def test_s3_env(tmp_path: Path) -> None:
    env = lc.s3_env(_cfg(tmp_path))
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "GRAFT_ARTIFACT_BUCKET"):
        assert env[k]


def test_trainer_requirements_and_cache_key() -> None:
    py = (
        '[project]\ndependencies=["boto3>=1"]\n[project.optional-dependencies]\n'
        'trainer=["torch==2.13.0","peft"]\noperator=["kopf"]\n'
    )
    reqs = lc.trainer_requirements(py)
    assert "torch==2.13.0" in reqs and "boto3>=1" in reqs and "kopf" not in reqs
    assert lc.wheelhouse_key(reqs) == lc.wheelhouse_key(list(reversed(reqs)))
    assert lc.wheelhouse_key(reqs) != lc.wheelhouse_key([*reqs, "x"])
    # a new lock or the other torch build is another wheelhouse
    assert lc.wheelhouse_key(reqs, lock="a==1\n") != lc.wheelhouse_key(reqs, lock="a==2\n")
    assert lc.wheelhouse_key(reqs, torch="cpu") != lc.wheelhouse_key(reqs, torch="cuda")


def test_pidfile_identity_check(tmp_path: Path) -> None:
    import os

    pf = tmp_path / "x.pid"
    st = lc.proc_starttime(os.getpid())
    pf.write_text(f"{os.getpid()} {st}\n")
    assert lc.pid_alive(pf) == os.getpid()
    pf.write_text(f"{os.getpid()} {st + 1}\n")  # same PID, other process: never signalled
    assert lc.pid_alive(pf) is None
    assert lc.pid_alive(tmp_path / "missing.pid") is None


def test_free_offsets_never_collide() -> None:
    """Offsets that are multiples of 20 in [1000, 2000) keep every cluster's ports distinct."""
    seen: dict[int, int] = {}
    for off in [0, *range(1000, 2000, 20)]:
        for port in vars(lc.Ports.with_offset(off)).values():
            assert port not in seen, (port, off, seen.get(port))
            seen[port] = off
    assert 1000 <= lc.find_free_offset() < 2000


def test_the_apiserver_audits_service_accounts_outside_kube_system(tmp_path: Path) -> None:
    import json

    cfg = _cfg(tmp_path)
    apiserver = lc.component_commands(cfg, Path("/bins"), tmp_path / "wrapper")["kube-apiserver"]
    assert f"--audit-policy-file={cfg.audit_policy}" in apiserver
    assert f"--audit-log-path={cfg.audit_log}" in apiserver
    policy = json.loads(lc.render_audit_policy())
    assert policy["apiVersion"] == "audit.k8s.io/v1"
    levels = [(r["level"], r.get("userGroups")) for r in policy["rules"]]
    # first match wins: the controller-manager's accounts are left out before all accounts
    assert levels == [
        ("None", ["system:serviceaccounts:kube-system"]),
        ("Metadata", ["system:serviceaccounts"]),
        ("None", None),
    ]
