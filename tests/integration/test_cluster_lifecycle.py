"""`down` stops every process `up` started, by PID, and nothing is left.

Runs a second, control-plane-only cluster in a temporary state dir on shifted ports, so it does
not disturb the session's cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cluster import LOCALCLUSTER_PY, load_localcluster

lc = load_localcluster()
pytestmark = pytest.mark.integration


def _descendants(pids: set[int]) -> set[int]:
    """All live processes below the given PIDs (by /proc/*/stat ppid)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LOCALCLUSTER_PY), *args], capture_output=True, text=True, timeout=240
    )


def test_down_leaves_no_process(tmp_path: Path, control_plane) -> None:
    # control_plane: the binaries are built (cold machine) and a second cluster must coexist
    state = tmp_path / "cluster"
    common = ["--state-dir", str(state)]
    r = _cli("up", "--mode", "control-plane", "--port-offset", str(lc.find_free_offset()), *common)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        c = lc.LocalCluster(state)
        running = {comp: pid for comp, pid in c.running().items() if pid}
        assert set(running) == set(lc.MODES["control-plane"]), running
        started = {(pid, lc.proc_starttime(pid)) for pid in running.values()}
        started |= {(pid, lc.proc_starttime(pid)) for pid in _descendants(set(running.values()))}
        assert lc.processes_with_marker(state), "started processes carry the marker"
        assert _cli("status", *common).returncode == 0
        # up again: idempotent, keeps the same processes
        r2 = _cli("up", "--mode", "control-plane", *common)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert {
            comp: pid for comp, pid in lc.LocalCluster(state).running().items() if pid
        } == running
    finally:
        d = _cli("down", *common)
    assert d.returncode == 0, d.stdout + d.stderr
    still = [(pid, st) for pid, st in started if st is not None and lc.proc_starttime(pid) == st]
    assert still == [], f"processes left after down: {still}"
    assert lc.processes_with_marker(state) == []
    assert _cli("status", *common).returncode != 0
    assert os.path.isdir(lc.k8s_bin_dir()), "down keeps the caches"


def test_half_started_cluster_is_cleaned_and_restarted(tmp_path: Path, control_plane) -> None:
    state = tmp_path / "cluster"
    common = ["--state-dir", str(state), "--port-offset", str(lc.find_free_offset())]
    r = _cli("up", "--mode", "control-plane", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        c = lc.LocalCluster(state)
        old_api = c.running()["kube-apiserver"]
        assert old_api
        os.kill(old_api, 9)  # a half-dead cluster: the apiserver is gone
        r2 = _cli("up", "--mode", "control-plane", *common)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert "half-started" in r2.stdout
        new = lc.LocalCluster(state)
        assert new.current_mode() == "control-plane" and new.healthy("control-plane")
    finally:
        assert _cli("down", "--state-dir", str(state)).returncode == 0
    assert lc.processes_with_marker(state) == []
