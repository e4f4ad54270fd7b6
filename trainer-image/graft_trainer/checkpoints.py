"""Resumable checkpoints in the output store: `<prefix>checkpoints/step-N/`, manifest last.

A checkpoint holds the trainable weights, optimizer, scheduler and RNG states, the data position
(the step: batch order depends only on the seed) and the loop's bookkeeping. A sharded spec's
(training.sharding fsdp) holds its weights and optimizer state in a torch.distributed.checkpoint
folder, `sharded/`, that every process wrote its shards into (graft_trainer.sharding). Only checkpoints
with a manifest count; older ones are pruned after a newer one is complete.

Nothing read back can run code: tensors and plain containers are loaded with
`torch.load(weights_only=True)` (no arbitrary unpickling), the rest is JSON, and every file is
checked against the manifest's sha256 first. A checkpoint changed after it was written (another
tenant with write access to the prefix, say) is refused, not resumed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

from graft.storage import (
    IntegrityError,
    Store,
    StoreError,
    download_artifact,
    latest_complete_checkpoint,
    list_checkpoints,
    read_manifest,
    write_artifact,
)
from graft.storage.artifacts import MANIFEST, checkpoint_uri
from graft.storage.uri import join_uri

KEEP = 2
FAULT_ENV = "GRAFT_FAULT_KILL_AFTER_CHECKPOINT"  # tests: SIGKILL after the Nth checkpoint


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # as a tensor and plain numbers: weights_only loading refuses numpy objects
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(
        self, prefix: str, store: Store, work_dir: Path, job_manifest: dict[str, Any]
    ) -> None:
        self.prefix = prefix
        self.store = store
        self.work_dir = work_dir
        self.job_manifest = job_manifest
        self.saved_this_process = 0

    def save(
        self,
        step: int,
        trainable: dict[str, Any] | None,
        optimizer: Any,
        scheduler: Any,
        state: dict[str, Any],
        best: dict[str, Any] | None,
        local: Path | None = None,
    ) -> str:
        """Write and upload the checkpoint of `step`. A sharded run passes `local`, the folder
        its ranks already wrote their shards of the weights and optimizer state into
        (sharding.save), and no `trainable` or `optimizer`."""
        import torch

        if local is None:
            local = self.work_dir / f"ckpt-{step:08d}"
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
        if trainable is not None:
            torch.save(trainable, local / "trainable.pt")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), local / "optimizer.pt")
        torch.save(scheduler.state_dict(), local / "scheduler.pt")
        torch.save(rng_state(), local / "rng.pt")
        if best is not None:
            torch.save(best, local / "best.pt")
        (local / "state.json").write_text(json.dumps(state, default=float))
        uri = checkpoint_uri(self.prefix, step)
        manifest = dict(self.job_manifest)
        manifest.update({"kind": "checkpoint", "step": step})
        write_artifact(local, uri, manifest, store=self.store)
        shutil.rmtree(local, ignore_errors=True)
        self.prune(keep_step=step)
        self.saved_this_process += 1
        fault = os.environ.get(FAULT_ENV)
        if fault and int(fault) == self.saved_this_process:
            os.kill(os.getpid(), signal.SIGKILL)
        return uri

    def prune(self, keep_step: int) -> None:
        """Drop checkpoints older than the newest KEEP complete ones (manifest first)."""
        found = list_checkpoints(self.prefix, self.store)
        complete = [s for s, _, c in found if c]
        keep = set(complete[-KEEP:]) | {keep_step}
        listing = self.store.list(self.prefix)
        for step, _uri, _ in found:
            if step in keep or step > keep_step:
                continue
            keys = [k for k in listing if k.startswith(f"step-{step:08d}/")]
            keys.sort(key=lambda k: k.endswith(MANIFEST), reverse=True)
            self.store.delete(join_uri(self.prefix, k) for k in keys)

    def latest(self) -> tuple[str, dict[str, Any]] | None:
        return latest_complete_checkpoint(self.prefix, self.store)

    def load(self, uri: str) -> dict[str, Any]:
        """The checkpoint's contents; IntegrityError when its files do not match its manifest
        or do not load as plain tensors and containers (nothing in it is executed)."""
        target = self.work_dir / "resume"
        local = self.download(uri, target)
        out = self.read(local, uri)
        shutil.rmtree(local, ignore_errors=True)
        return out

    def download(self, uri: str, target: Path) -> Path:
        """The checkpoint's files in `target`, each checked against its manifest."""
        shutil.rmtree(target, ignore_errors=True)
        try:
            local, _ = download_artifact(uri, target, store=self.store)
        except IntegrityError as exc:
            raise IntegrityError(f"checkpoint refused: {exc}") from None
        return Path(local)

    def read(self, local: Path, uri: str, best: bool = True) -> dict[str, Any]:
        """A downloaded checkpoint's contents (trainable and optimizer None where a sharded
        run keeps them in its DCP folder; best only when asked)."""
        import pickle

        import torch

        def tensors(name: str) -> Any:
            if not (local / name).is_file():
                return None
            try:
                return torch.load(local / name, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise IntegrityError(
                    f"checkpoint {uri}{name} holds more than tensors and plain containers "
                    f"(refused, nothing in it was run): {str(exc).splitlines()[0]}"
                ) from None

        return {
            "state": json.loads((local / "state.json").read_text()),
            "trainable": tensors("trainable.pt"),
            "optimizer": tensors("optimizer.pt"),
            "scheduler": tensors("scheduler.pt"),
            "rng": tensors("rng.pt"),
            "best": tensors("best.pt") if best else None,
        }


def agreed_checkpoint(
    ckpts: CheckpointManager, latest: tuple[str, dict[str, Any]] | None, acc: Any
) -> tuple[str, dict[str, Any]] | None:
    """Rank 0's latest checkpoint, in every process of a data-parallel run (a collective):
    processes in other pods list the store at other moments, and all must resume the same
    step. Each process then downloads it and checks every file against its manifest."""
    import torch
    import torch.distributed as dist

    mine = int(latest[1]["step"]) if latest is not None else -1
    chosen = torch.tensor([mine], dtype=torch.int64, device=acc.device)
    dist.broadcast(chosen, src=0)
    step = int(chosen.item())
    if step < 0:
        return None
    if step == mine:
        return latest
    uri = checkpoint_uri(ckpts.prefix, step)
    manifest = read_manifest(uri, ckpts.store)
    if manifest is None:
        raise StoreError(
            f"checkpoint {uri}: rank 0 resumes it, but its manifest cannot be read here"
        )
    return uri, manifest
