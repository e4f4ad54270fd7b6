"""Data parallelism in one pod: a FineTuneJob with `resources.gpu > 1` trains as one process
per GPU, each on its share of every step's micro-batches, with gradients averaged by DDP
(set up through accelerate). Rank 0 evaluates, checkpoints, reports and writes the outputs;
the other ranks only compute their share of the gradients.

The processes are started here rather than by torchrun: torchrun turns every worker failure
into exit code 1, and the trainer's exit code 2 (invalid input: not worth retrying) must reach
the operator.
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
from pathlib import Path
from typing import Any

from graft_trainer import outcome
from graft_trainer.errors import EXIT_FAILURE, EXIT_INVALID, GraftInputError

# Forces the number of processes (e.g. 2 on a CPU, where gloo stands in for NCCL: tests).
PROCESSES_ENV = "GRAFT_DATA_PARALLEL"
# Ranks wait for rank 0 while it evaluates or uploads a checkpoint.
COLLECTIVE_TIMEOUT_S = 2 * 3600
# Each process runs this module (graft_trainer/parallel_worker.py): one rank of the run.
WORKER_MODULE = "graft_trainer.parallel_worker"


def processes(spec: Any) -> int:
    """How many training processes the spec gets here (1: no data parallelism)."""
    forced = os.environ.get(PROCESSES_ENV)
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise GraftInputError(f"{PROCESSES_ENV}={forced!r}: expected a number of processes ≥ 1")
        return int(forced)
    if spec.search is not None or spec.resources.gpu <= 1:
        return 1  # a search runs trials, each in its own process or pod
    import torch

    return max(1, min(int(spec.resources.gpu), int(torch.cuda.device_count())))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def in_worker() -> bool:
    """True inside one of several data-parallel processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
) -> outcome.RunEnd:
    """Run the FineTuneJob as `count` processes; how rank 0's run ended."""
    with tempfile.TemporaryDirectory(prefix="graft-ddp-") as tmp:
        doc_path = Path(tmp) / "resource.json"
        doc_path.write_text(json.dumps(document))
        result_path = Path(tmp) / "result.json"
        port = str(_free_port())
        workers = []
        for r in range(count):
            env = {
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(count),
                "LOCAL_WORLD_SIZE": str(count),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                # the ranks' meeting place on disk (sharded checkpoints: sharding.py)
                "GRAFT_PARALLEL_DIR": tmp,
            }
            args = [sys.executable, "-m", WORKER_MODULE, str(doc_path), artifacts_uri]
            args += [reporter_name or "", str(work_dir or ""), str(result_path)]
            workers.append(subprocess.Popen(args, env=env))
        codes = _wait_all(workers)
        if result_path.exists():
            return outcome.RunEnd.from_json(result_path.read_text())
        failed = next((r for r, c in enumerate(codes) if c), 0)
        code = codes[failed]
        return outcome.failed(
            document,
            EXIT_INVALID if code == EXIT_INVALID else EXIT_FAILURE,
            f"training process {failed} of {count} exited with code {code}",
        )


def _wait_all(workers: list[subprocess.Popen[bytes]]) -> list[int]:
    """Wait for every worker; once one fails, stop the rest (they would wait on it forever)."""
    while any(w.poll() is None for w in workers):
        if any(w.returncode not in (None, 0) for w in workers):
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            for w in workers:
                try:
                    w.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.kill()
            break
        time.sleep(0.2)
    return [int(w.wait()) for w in workers]
