"""A multi-node job's pod environment (graft.contract's GRAFT_NODES, GRAFT_NODE_RANK,
GRAFT_RENDEZVOUS_ADDR/PORT) as the trainer reads it: the ranks and torch.distributed variables
of each process, refusals of a bad environment (exit 2, naming the variable), and how a pod's
launcher turns its processes' exit codes into the pod's (4: a peer in another pod lost)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from graft.contract import decode_termination
from graft.exit_codes import EXIT_FAILURE, EXIT_INVALID_INPUT, EXIT_PEER_LOST
from graft_trainer import outcome, parallel
from graft_trainer.errors import GraftInputError
from graft_trainer.parallel import Topology, launcher_end, topology


def spec(nodes: int | None) -> Any:
    return SimpleNamespace(resources=SimpleNamespace(node_count=nodes or 1))


def pod_env(nodes: str = "3", rank: str = "1", port: str = "29400") -> dict[str, str]:
    return {
        "GRAFT_NODES": nodes,
        "GRAFT_NODE_RANK": rank,
        "GRAFT_RENDEZVOUS_ADDR": "ftj-0.ftj-ranks",
        "GRAFT_RENDEZVOUS_PORT": port,
    }


def test_a_pods_ranks_follow_its_node_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    topo = topology(spec(3), per_node=2, env=pod_env())
    assert (topo.nodes, topo.node_rank, topo.per_node, topo.world) == (3, 1, 2, 6)
    assert topo.here == [1] and topo.across_pods and not topo.reports_outcome
    env = topo.worker_env(1, 1, topo.port)
    assert env["RANK"] == "3" and env["LOCAL_RANK"] == "1"
    assert env["WORLD_SIZE"] == "6" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "ftj-0.ftj-ranks" and env["MASTER_PORT"] == "29400"
    assert env["GRAFT_NODE_RANK"] == "1" and env["GROUP_RANK"] == "1"
    # across pods, NCCL raises in the collective instead of aborting the process
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    # node 0's first process is global rank 0
    assert topology(spec(3), 2, env=pod_env(rank="0")).worker_env(0, 0, 29400)["RANK"] == "0"


def test_one_process_per_pod_still_runs_as_a_worker_of_the_whole_world() -> None:
    topo = topology(spec(2), per_node=1, env=pod_env(nodes="2", rank="1"))
    assert topo.world == 2 and topo.worker_env(1, 0, 1)["RANK"] == "1"


def test_without_the_variables_a_job_is_one_pod_or_graft_runs_every_node() -> None:
    single = topology(spec(None), per_node=2, env={})
    assert (single.world, single.here, single.across_pods) == (2, [0], False)
    assert topology(spec(1), per_node=1, env={"GRAFT_NODES": "1"}).world == 1
    local = topology(spec(2), per_node=2, env={}, local=True)
    assert local.world == 4 and local.here == [0, 1] and not local.across_pods
    # each local node's processes: ranks 0-1 and 2-3, told their node like a pod's
    assert local.worker_env(1, 0, 5000)["RANK"] == "2"
    assert local.worker_env(1, 0, 5000)["GRAFT_NODE_RANK"] == "1"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in local.worker_env(1, 0, 5000)


@pytest.mark.parametrize(
    ("env", "nodes", "named"),
    [
        (pod_env(nodes="2", rank="2"), 2, "GRAFT_NODE_RANK='2'"),
        (pod_env(nodes="2", rank=""), 2, "GRAFT_NODE_RANK=''"),
        (pod_env(nodes="2", rank="-1"), 2, "GRAFT_NODE_RANK='-1'"),
        (pod_env(nodes="two"), 2, "GRAFT_NODES='two'"),
        (pod_env(nodes="0"), 2, "GRAFT_NODES='0'"),
        (pod_env(nodes="3"), 2, "GRAFT_NODES=3 but spec.resources.nodes is 2"),
        (pod_env(nodes="2", rank="0", port="0"), 2, "GRAFT_RENDEZVOUS_PORT='0'"),
        (pod_env(nodes="2", rank="0", port="70000"), 2, "GRAFT_RENDEZVOUS_PORT"),
        ({**pod_env(nodes="2", rank="0"), "GRAFT_RENDEZVOUS_ADDR": ""}, 2, "GRAFT_RENDEZVOUS_ADDR"),
        ({}, 2, "GRAFT_NODES is not set but spec.resources.nodes is 2"),
    ],
)
def test_a_bad_pod_environment_is_refused_naming_the_variable(
    env: dict[str, str], nodes: int, named: str
) -> None:
    with pytest.raises(GraftInputError, match=named.replace("(", r"\(")):
        topology(spec(nodes), per_node=1, env=env)


def test_a_pod_with_a_bad_node_rank_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graft_trainer.__main__ import run_resource

    for key, value in pod_env(nodes="2", rank="2").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("GRAFT_DATA_PARALLEL", raising=False)
    doc = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "nodes", "namespace": "default"},
        "spec": {
            "model": {"uri": f"file://{tmp_path}/model"},
            "dataset": {"uri": f"file://{tmp_path}/data.jsonl", "textTemplate": "{text}"},
            "resources": {"nodes": 2},
        },
    }
    end = run_resource(doc, f"file://{tmp_path}/out/", "none")
    assert end.code == EXIT_INVALID_INPUT
    assert "GRAFT_NODE_RANK='2'" in end.message and "0 to 1" in end.message
    assert not (tmp_path / "out").exists()  # refused before anything was written


POD1 = Topology(nodes=2, node_rank=1, per_node=2, addr="h", port=1)
POD0 = Topology(nodes=2, node_rank=0, per_node=2, addr="h", port=1)


def test_a_pod_other_than_node_0_succeeds_without_an_outcome() -> None:
    end = launcher_end(None, POD1, None, [(2, 0), (3, 0)], [])
    assert end.code == 0 and end.outcome is None
    assert end.message.startswith("node 1 of 2 finished")
    # its termination message is that line, not an outcome competing with node 0's
    assert decode_termination(outcome.termination_message(end)) is None
    assert not parallel.reports_outcome({"GRAFT_NODES": "2", "GRAFT_NODE_RANK": "1"})
    assert parallel.reports_outcome({"GRAFT_NODES": "2", "GRAFT_NODE_RANK": "0"})
    assert parallel.reports_outcome({})


def test_a_lost_peer_is_4_but_a_process_of_this_pod_that_died_is_its_own_failure() -> None:
    lost = launcher_end(None, POD1, None, [(2, EXIT_PEER_LOST), (3, EXIT_PEER_LOST)], [0, 1])
    assert lost.code == EXIT_PEER_LOST and "another pod" in lost.message
    # local process 3 was killed first (-9); process 2 then lost it: the pod failed itself
    own = launcher_end(None, POD1, None, [(2, EXIT_PEER_LOST), (3, -9)], [1, 0])
    assert own.code == EXIT_FAILURE and "training process 3 of 4 exited with code -9" in own.message
    # rank 0's result says 4: node 0 reports it, unless one of its own processes died
    rank0 = outcome.failed(None, EXIT_PEER_LOST, "lost a training process of another pod")
    result = rank0.to_json()
    assert launcher_end(None, POD0, result, [(0, 4), (1, 4)], [0, 1]).code == EXIT_PEER_LOST
    assert launcher_end(None, POD0, result, [(0, 4), (1, 1)], [1, 0]).code == EXIT_FAILURE
    # invalid input keeps its code
    bad = launcher_end(None, POD1, None, [(2, EXIT_INVALID_INPUT), (3, 0)], [0])
    assert bad.code == EXIT_INVALID_INPUT
    # one pod (or graft run's local nodes): there is no other pod to have lost
    single = Topology(per_node=2)
    assert launcher_end(None, single, None, [(0, 4), (1, 4)], [0, 1]).code == EXIT_FAILURE
    local = Topology(nodes=2, per_node=1, local=True)
    assert launcher_end(None, local, None, [(0, 4), (1, 4)], [0, 1]).code == EXIT_FAILURE
    ok = outcome.RunEnd(0, "finished", None).to_json()
    assert launcher_end(None, POD0, ok, [(0, 0), (1, 0)], []).message == "finished"


def test_peer_lost_is_a_collectives_connection_error_once_the_group_is_up(
    tmp_path: Path,
) -> None:
    import torch.distributed as dist

    closed = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1945")
    assert not parallel.peer_lost(closed)  # no process group: not a peer's
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert parallel.peer_lost(closed)
        assert parallel.peer_lost(RuntimeError("Read error: Connection reset by peer"))
        assert not parallel.peer_lost(RuntimeError("CUDA out of memory"))
        assert not parallel.peer_lost(ValueError("connection closed by peer"))
    finally:
        dist.destroy_process_group()
