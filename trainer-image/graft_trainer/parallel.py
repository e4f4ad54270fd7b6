"""Data parallelism: a FineTuneJob with `resources.gpu > 1` trains as one process per GPU,
each on its share of every step's micro-batches, with gradients averaged by DDP (set up
through accelerate). Rank 0 evaluates, checkpoints, reports and writes the outputs; the other
ranks only compute their share of the gradients.

A multi-node job (`resources.nodes` N > 1, one pod per node) runs the same processes in every
pod: the operator sets GRAFT_NODES, GRAFT_NODE_RANK and GRAFT_RENDEZVOUS_ADDR/PORT
(graft.contract), and each pod's launcher starts its share of the N x per-pod ranks (`Topology`);
global rank 0 (node 0) hosts the torch.distributed store at the rendezvous address. `graft run`
starts every node's processes on this machine instead (`Topology.local`), each node with its own
parallel folder, as pods that share no disk.

The processes are started here rather than by torchrun: torchrun turns every worker failure
into exit code 1, and the trainer's exit codes (2: invalid input, not worth retrying; 4: a
peer in another pod was lost) must reach the operator.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.contract import ENV_NODE_RANK, ENV_NODES, ENV_RENDEZVOUS_ADDR, ENV_RENDEZVOUS_PORT
from graft.exit_codes import EXIT_PEER_LOST
from graft_trainer import outcome
from graft_trainer.errors import (
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_UNTRUSTED_STORAGE,
    GraftInputError,
)

# Forces the number of processes (e.g. 2 on a CPU, where gloo stands in for NCCL: tests).
PROCESSES_ENV = "GRAFT_DATA_PARALLEL"
# Ranks wait for rank 0 while it evaluates or uploads a checkpoint.
COLLECTIVE_TIMEOUT_S = 2 * 3600
# Each process runs this module (graft_trainer/parallel_worker.py): one rank of the run.
WORKER_MODULE = "graft_trainer.parallel_worker"
# NCCL's reaction to a failed or timed-out collective (2: abort the communicators and raise).
NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
# What a collective's error says when the process at the other end went away (gloo's
# "Connection closed by peer" / "Connection reset by peer", NCCL's remote error and watchdog
# timeout, the store's broken connection).
PEER_LOST_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote process exited",
    "network error",
    "communicator was aborted",
    "collective operation timeout",
    "timed out",
    "timeout",
)


def processes(spec: Any) -> int:
    """How many training processes the spec gets in this pod (1: no data parallelism)."""
    forced = os.environ.get(PROCESSES_ENV)
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise GraftInputError(f"{PROCESSES_ENV}={forced!r}: expected a number of processes ≥ 1")
        return int(forced)
    if spec.search is not None or spec.resources.gpu <= 1:
        return 1  # a search runs trials, each in its own process or pod
    import torch

    return max(1, min(int(spec.resources.gpu), int(torch.cuda.device_count())))


@dataclass(frozen=True)
class Topology:
    """Where the ranks of a run are: `nodes` pods of `per_node` processes each, this pod being
    `node_rank`; `addr`:`port` is the rendezvous (global rank 0 hosts the store there; port 0:
    a free one on 127.0.0.1, chosen at launch). `local`: every node's processes run here
    (`graft run`), each node with its own parallel folder."""

    nodes: int = 1
    node_rank: int = 0
    per_node: int = 1
    addr: str = "127.0.0.1"
    port: int = 0
    local: bool = False

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    @property
    def here(self) -> list[int]:
        """The nodes whose processes this launcher starts."""
        return list(range(self.nodes)) if self.local else [self.node_rank]

    @property
    def across_pods(self) -> bool:
        """Ranks run in other pods: losing one is a peer lost (exit 4), not this pod's fault."""
        return self.nodes > 1 and not self.local

    @property
    def reports_outcome(self) -> bool:
        """This pod hosts global rank 0, whose run's end is the resource's."""
        return self.node_rank == 0 or self.local

    def global_rank(self, node: int, local_rank: int) -> int:
        return node * self.per_node + local_rank

    def worker_env(self, node: int, local_rank: int, port: int) -> dict[str, str]:
        """The torch.distributed variables of one process (and the multi-node ones, so that
        the process reads the same topology)."""
        env = {
            "RANK": str(self.global_rank(node, local_rank)),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(self.world),
            "LOCAL_WORLD_SIZE": str(self.per_node),
            "GROUP_RANK": str(node),
            "MASTER_ADDR": self.addr,
            "MASTER_PORT": str(port),
        }
        if self.nodes > 1:
            env.update(
                {
                    ENV_NODES: str(self.nodes),
                    ENV_NODE_RANK: str(node),
                    ENV_RENDEZVOUS_ADDR: self.addr,
                    ENV_RENDEZVOUS_PORT: str(port),
                }
            )
        if self.across_pods and NCCL_ERROR_HANDLING_ENV not in os.environ:
            # NCCL's default tears the process down (SIGABRT) when a peer's connection
            # fails; this aborts the communicators and raises in the waiting collective,
            # so the process can say a peer was lost (exit 4). Untested here: no GPUs.
            env[NCCL_ERROR_HANDLING_ENV] = "2"
        return env

    def node_label(self) -> str:
        return f"node {self.node_rank} of {self.nodes}: " if self.across_pods else ""


def topology(
    spec: Any, per_node: int, local: bool = False, env: Mapping[str, str] | None = None
) -> Topology:
    """This pod's place in the run from the multi-node variables (graft.contract), checked
    against `spec.resources.nodes`. `local` (`graft run`): a multi-node spec without them runs
    every node here. GraftInputError (exit 2) names the variable that is wrong."""
    env = os.environ if env is None else env
    wanted = int(spec.resources.node_count)
    raw = env.get(ENV_NODES, "").strip()
    if not raw:
        if wanted > 1 and not local:
            raise GraftInputError(
                f"{ENV_NODES} is not set but spec.resources.nodes is {wanted}: a multi-node "
                f"job's pods need {ENV_NODES}, {ENV_NODE_RANK} and {ENV_RENDEZVOUS_ADDR}/PORT"
            )
        return Topology(nodes=wanted, per_node=per_node, local=wanted > 1)
    nodes = _positive(ENV_NODES, raw)
    if nodes != wanted:
        raise GraftInputError(
            f"{ENV_NODES}={nodes} but spec.resources.nodes is {wanted}: the pod was started "
            "for another spec"
        )
    if nodes == 1:
        return Topology(per_node=per_node)
    rank_raw = env.get(ENV_NODE_RANK, "").strip()
    if not rank_raw.isdigit() or int(rank_raw) >= nodes:
        raise GraftInputError(
            f"{ENV_NODE_RANK}={rank_raw!r}: expected this pod's index, 0 to {nodes - 1} "
            f"({ENV_NODES}={nodes})"
        )
    addr = env.get(ENV_RENDEZVOUS_ADDR, "").strip()
    if not addr:
        raise GraftInputError(
            f"{ENV_RENDEZVOUS_ADDR} is not set: expected the host of node 0's pod"
        )
    port_raw = env.get(ENV_RENDEZVOUS_PORT, "").strip()
    if not port_raw.isdigit() or not 0 < int(port_raw) < 65536:
        raise GraftInputError(
            f"{ENV_RENDEZVOUS_PORT}={port_raw!r}: expected a TCP port, 1 to 65535"
        )
    return Topology(nodes, int(rank_raw), per_node, addr, int(port_raw))


def _positive(name: str, raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise GraftInputError(f"{name}={raw!r}: expected a number of pods ≥ 1")
    return int(raw)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def in_worker() -> bool:
    """True inside one of several data-parallel processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def reports_outcome(env: Mapping[str, str] | None = None) -> bool:
    """False in the pods of a multi-node job other than node 0: node 0's outcome is the
    resource's, the others leave none beside the artifacts."""
    env = os.environ if env is None else env
    nodes, node_rank = env.get(ENV_NODES, "").strip(), env.get(ENV_NODE_RANK, "").strip()
    return not (nodes.isdigit() and int(nodes) > 1 and node_rank not in ("", "0"))


def peer_lost(exc: BaseException) -> bool:
    """Whether a training process's error means another process went away (a collective or
    the store lost its connection, or timed out waiting): only once the process group is up."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(sign in text for sign in PEER_LOST_SIGNS)


def accelerator(device: str) -> Any:
    """The process group of this worker (NCCL on GPUs, gloo on CPUs), via accelerate."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Accelerator(
        cpu=device != "cuda",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))],
    )


def broadcast_int(acc: Any, value: int) -> int:
    """Rank 0's `value`, in every process (a collective)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([value], dtype=torch.int64, device=acc.device)
    dist.broadcast(flag, src=0)
    return int(flag.item())


def _death_signal() -> Any:
    """A preexec_fn for a worker (Linux): SIGKILL when its launcher dies, so that a launcher
    killed outside a container (a test's timeout, `graft run` killed) leaves no training
    processes behind waiting on collectives. None where prctl is missing. Resolved here, in
    the launcher: the child between fork and exec only calls it."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None).prctl
    except (AttributeError, OSError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_data_parallel(
    document: dict[str, Any],
    artifacts_uri: str,
    reporter_name: str | None,
    count: int,
    work_dir: Path | None = None,
    topo: Topology | None = None,
) -> outcome.RunEnd:
    """Run this pod's share of the FineTuneJob's processes (`count` per node; every node's
    with a local topology); how the run ended, as this pod should report it."""
    topo = topo or Topology(per_node=count)
    with tempfile.TemporaryDirectory(prefix="graft-ddp-") as tmp:
        doc_path = Path(tmp) / "resource.json"
        doc_path.write_text(json.dumps(document))
        result_path = Path(tmp) / "result.json"
        port = topo.port or _free_port()
        workers, ranks = [], []
        die_with_launcher = _death_signal()
        for node in topo.here:
            # the ranks' meeting place on disk (sharded checkpoints: sharding.py), one per pod
            parallel_dir = Path(tmp) / f"node-{node}" if topo.local else Path(tmp)
            parallel_dir.mkdir(exist_ok=True)
            for local_rank in range(topo.per_node):
                env = {
                    **os.environ,
                    **topo.worker_env(node, local_rank, port),
                    "GRAFT_PARALLEL_DIR": str(parallel_dir),
                }
                args = [sys.executable, "-m", WORKER_MODULE, str(doc_path), artifacts_uri]
                args += [reporter_name or "", str(work_dir or ""), str(result_path)]
                workers.append(subprocess.Popen(args, env=env, preexec_fn=die_with_launcher))
                ranks.append(topo.global_rank(node, local_rank))
        codes, failed_first = _wait_all(workers)
        result = result_path.read_text() if result_path.exists() else None
        return launcher_end(
            document, topo, result, list(zip(ranks, codes, strict=True)), failed_first
        )


def launcher_end(
    document: dict[str, Any] | None,
    topo: Topology,
    result: str | None,
    codes: list[tuple[int, int]],
    failed_first: list[int],
) -> outcome.RunEnd:
    """How this pod's run ended, from rank 0's result (when this pod hosts it) and the exit
    codes of its processes, (global rank, code), `failed_first` their indices in the order
    they were seen failing. A process of this pod that failed by itself (not 0, not 4) decides
    the pod's code; else a lost peer (4) across pods; else rank 0's result; else success."""
    world = topo.world
    own = [i for i in failed_first if codes[i][1] not in (0, EXIT_PEER_LOST)]
    lost = any(code == EXIT_PEER_LOST for _, code in codes)
    if result is not None:
        end = outcome.RunEnd.from_json(result)
        if end.code != EXIT_PEER_LOST or (topo.across_pods and not own):
            return end
    label = topo.node_label()
    if own:
        r, code = codes[own[0]]
        keep = code in (EXIT_INVALID, EXIT_UNTRUSTED_STORAGE)
        message = f"{label}training process {r} of {world} exited with code {code}"
        return outcome.failed(document, code if keep else EXIT_FAILURE, message)
    if lost and topo.across_pods:
        message = (
            f"{label}a training process in another pod went away (its pod failed or was "
            "deleted); every pod restarts from the last checkpoint"
        )
        return outcome.failed(document, EXIT_PEER_LOST, message)
    if lost:
        message = f"training process lost a peer among the {world} processes of this run"
        return outcome.failed(document, EXIT_FAILURE, message)
    if topo.reports_outcome:
        return outcome.failed(document, EXIT_FAILURE, "training process 0 left no result")
    message = (
        f"node {topo.node_rank} of {topo.nodes} finished its share of training; node 0 "
        "reports the outcome"
    )
    return outcome.RunEnd(0, message, None)


def _wait_all(workers: list[subprocess.Popen[bytes]]) -> tuple[list[int], list[int]]:
    """Wait for every worker; once one fails, stop the rest (they would wait on it forever).
    The exit codes, and the indices of the workers that failed by themselves, in the order
    they were seen failing (a worker stopped here by SIGTERM or SIGKILL is not among them)."""
    failed: list[int] = []
    stopped: set[int] = set()
    while any(w.poll() is None for w in workers):
        failed += [i for i, w in enumerate(workers) if w.returncode and i not in failed]
        if failed:
            for i, w in enumerate(workers):
                if w.poll() is None:
                    stopped.add(i)
                    w.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            for w in workers:
                try:
                    w.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.kill()
            break
        time.sleep(0.2)
    codes = [int(w.wait()) for w in workers]
    ours = (-signal.SIGTERM, -signal.SIGKILL)
    for i, code in enumerate(codes):
        if code and i not in failed and not (i in stopped and code in ours):
            failed.append(i)
    return codes, failed
