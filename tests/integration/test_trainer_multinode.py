"""Multi-node data parallelism (`resources.nodes: 2`), exercised on the CPU as the pods run it:
two trainer launchers (`graft-trainer run-resource`, one per "pod", each with its own parallel
folder), told their place by GRAFT_NODES, GRAFT_NODE_RANK and GRAFT_RENDEZVOUS_ADDR/PORT, meet
over gloo on 127.0.0.1 and train what one process accumulating the same micro-batches trains;
when one pod dies after a checkpoint, the other exits 4 (a peer lost) instead of waiting, and
both relaunched resume from the checkpoint; `graft run` runs the same spec as local processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from graft.contract import ENV_NODE_RANK, ENV_NODES, ENV_RENDEZVOUS_ADDR, ENV_RENDEZVOUS_PORT
from graft.exit_codes import EXIT_PEER_LOST
from graft.storage import latest_complete_checkpoint, read_manifest
from tests.integration.trainer_kit import job_document, pod_invocation, run_trainer_pod, shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(900)]

# 240 train records at 16 per micro-batch: 15 micro-batches per epoch; one per pod per step.
TRAINING = {"maxSteps": None, "epochs": 1, "evalSteps": 4, "saveSteps": 4, "loggingSteps": 2}
# A peer lost: far below the collective timeout (2 h) a hung survivor would wait.
PEER_LOST_BOUND_S = 90


@pytest.fixture(scope="session")
def kit() -> dict[str, Path]:
    return shared_kit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pod(
    doc: dict[str, Any], uri: str, work: Path, node: int, port: int, **env: str
) -> subprocess.Popen[str]:
    """One pod of a two-node job: `graft-trainer run-resource` with the pod's environment, in
    its own process group (the pod), its output in work/node-N.log."""
    pod_env = {
        "GRAFT_REPORTER": "none",
        "OMP_NUM_THREADS": "1",
        "GRAFT_DATA_PARALLEL": "1",
        ENV_NODES: "2",
        ENV_NODE_RANK: str(node),
        ENV_RENDEZVOUS_ADDR: "127.0.0.1",
        ENV_RENDEZVOUS_PORT: str(port),
        **env,
    }
    args, full_env = pod_invocation(doc, uri, work, **pod_env)
    log = (work / f"node-{node}.log").open("a")
    return subprocess.Popen(
        args,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_two_pods(doc: dict[str, Any], uri: str, work: Path) -> list[int]:
    port = free_port()
    pods = [start_pod(doc, uri, work, node, port) for node in (0, 1)]
    return [pod.wait(timeout=600) for pod in pods]


def train_losses(metrics: dict[str, Any]) -> list[float]:
    return [h["train_loss"] for h in metrics["history"] if "train_loss" in h]


def test_two_pods_train_what_one_process_trains(kit: dict[str, Path], tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/out/"
    doc = job_document(kit, name="nodes", training=TRAINING, resources={"nodes": 2})
    assert run_two_pods(doc, uri, tmp_path) == [0, 0]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    run = metrics["run"]
    # 15 micro-batches, one per pod per optimizer step: 8 steps over 2 processes.
    assert run["processes"] == 2 and run["totalSteps"] == run["finalStep"] == 8
    # Node 0's outcome beside the artifacts; node 1 says it finished and left none.
    said = json.loads((tmp_path / "out" / "outcome.json").read_text())
    assert said["state"] == "Succeeded" and "finished at step 8" in said["message"]
    node1 = (tmp_path / "node-1.log").read_text()
    assert "node 1 of 2 finished its share of training" in node1
    found = latest_complete_checkpoint(uri + "checkpoints/")
    assert found is not None and found[1]["processes"] == 2 and found[1]["step"] == 4

    # One process accumulating the same two micro-batches per step trains the same model.
    single_uri = f"file://{tmp_path}/single/"
    single_doc = job_document(
        kit, name="nodes", training={**TRAINING, "gradientAccumulationSteps": 2}
    )
    # Whole micro-batches in every run (graft_trainer.memory: several processes always run
    # them whole; one process would split them at the token budget, the same sums in another
    # order, which a few training steps amplify past these tests' 1e-3).
    env = {"GRAFT_DATA_PARALLEL": "1", "OMP_NUM_THREADS": "1", "GRAFT_TOKEN_BUDGET": "0"}
    assert run_trainer_pod(single_doc, single_uri, tmp_path, **env).returncode == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert single["run"]["processes"] == 1 and single["run"]["finalStep"] == 8
    assert single["run"]["tokens"] == run["tokens"]
    assert train_losses(metrics) == pytest.approx(train_losses(single), rel=1e-3)
    assert metrics["final"]["eval_loss"] == pytest.approx(single["final"]["eval_loss"], rel=1e-3)


def test_a_pod_lost_ends_the_other_with_4_and_both_resume(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/out/"
    training = {"maxSteps": 24, "evalSteps": 100, "saveSteps": 2, "loggingSteps": 1}
    doc = job_document(kit, name="nodes-lost", training=training, resources={"nodes": 2})
    port = free_port()
    # Node 0's training process is killed right after its first checkpoint (step 2); the
    # test then kills the rest of that pod, as a node lost or a pod deleted would.
    node0 = start_pod(doc, uri, tmp_path, 0, port, GRAFT_FAULT_KILL_AFTER_CHECKPOINT="1")
    node1 = start_pod(doc, uri, tmp_path, 1, port)
    deadline = time.monotonic() + 600
    while latest_complete_checkpoint(uri + "checkpoints/") is None:
        assert time.monotonic() < deadline and node1.poll() is None
        time.sleep(0.2)
    lost_at = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node0.pid, signal.SIGKILL)
    node0.wait(timeout=60)
    assert node1.wait(timeout=PEER_LOST_BOUND_S + 30) == EXIT_PEER_LOST
    took = time.monotonic() - lost_at
    (tmp_path / "peer-lost-seconds.txt").write_text(f"{took:.1f}\n")  # for people
    assert took < PEER_LOST_BOUND_S
    node1_log = (tmp_path / "node-1.log").read_text()
    assert "a training process in another pod went away" in node1_log
    assert read_manifest(uri) is None  # nothing published
    found = latest_complete_checkpoint(uri + "checkpoints/")
    assert found is not None and found[1]["step"] == 2 and found[1]["processes"] == 2

    # The attempt restarted: both pods resume from step 2 and finish.
    assert run_two_pods(doc, uri, tmp_path) == [0, 0]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["run"]["resumedFrom"] == 2 and metrics["run"]["finalStep"] == 24
    assert metrics["run"]["processes"] == 2


def test_graft_run_runs_a_two_node_spec_as_local_processes(
    kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from graft.cli import main

    monkeypatch.setenv("GRAFT_DATA_PARALLEL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    doc = job_document(
        kit,
        name="local-nodes",
        training={"maxSteps": 4, "evalSteps": 2, "saveSteps": 100, "loggingSteps": 1},
        resources={"nodes": 2},
    )
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    out = tmp_path / "runs"
    assert main(["run", str(job), "--out", str(out), "--reporter", "none"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["processes"] == 2 and metrics["run"]["finalStep"] == 4
    assert metrics["final"]["eval_loss"] < metrics["baseline"]["eval_loss"]


def test_node_0_exits_4_with_its_outcome_when_node_1_is_lost(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/out/"
    training = {"maxSteps": 300, "evalSteps": 1000, "saveSteps": 2, "loggingSteps": 1}
    doc = job_document(kit, name="nodes-lost-1", training=training, resources={"nodes": 2})
    port = free_port()
    node0 = start_pod(doc, uri, tmp_path, 0, port)
    node1 = start_pod(doc, uri, tmp_path, 1, port)
    deadline = time.monotonic() + 600
    while latest_complete_checkpoint(uri + "checkpoints/") is None:
        assert time.monotonic() < deadline and node0.poll() is None
        time.sleep(0.2)
    # node 1's pod is deleted with grace period 0, some 298 steps before the end
    os.killpg(node1.pid, signal.SIGKILL)
    lost_at = time.monotonic()
    node1.wait(timeout=60)
    assert node0.wait(timeout=PEER_LOST_BOUND_S + 30) == EXIT_PEER_LOST
    assert time.monotonic() - lost_at < PEER_LOST_BOUND_S
    # node 0 reports the run's end: failed, a peer lost, nothing published
    said = json.loads((tmp_path / "out" / "outcome.json").read_text())
    assert said["state"] == "Failed"
    assert said["message"].startswith("lost a training process of another pod")
    assert read_manifest(uri) is None
