"""Sharded full fine-tunes (`training.sharding.strategy: fsdp`): the pod's training processes
(parallel.py) split the model's weights, gradients and optimizer state between them with
PyTorch FSDP2 (`fully_shard`) instead of each holding all of them.

- Each decoder block is one FSDP unit, the loss module (lm_loss, with the embeddings, final norm
  and LM head) the root: a block's weights are gathered only while it computes.
- Rank 0 still evaluates and publishes, on an unsharded copy of the model kept in host memory
  (moved to the GPU only while it evaluates): before each evaluation and after the last step
  every rank gathers the sharded weights into it (`gather`).
- Checkpoints are torch.distributed.checkpoint (DCP) folders: one file of shards per rank plus
  the metadata. DCP reshards on load, so a checkpoint resumes with another number of processes
  (the engine keeps its micro-batches per step). Reading one runs no code: its metadata is
  unpickled with an allow-list of DCP's own classes, and every value is loaded with
  `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graft.storage import IntegrityError

# Where the processes of one pod meet on disk (checkpoints are written and read there):
# parallel.run_data_parallel sets it to a folder all of them can reach.
SHARED_DIR_ENV = "GRAFT_PARALLEL_DIR"
# The DCP folder inside a checkpoint.
SHARDED_DIR = "sharded"
# What a checkpoint's DCP metadata may name (module -> names; None: any name in the module).
_METADATA_GLOBALS: dict[str, set[str] | None] = {
    "torch.distributed.checkpoint.metadata": None,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


def shared_dir(default: Path) -> Path:
    """The folder every process of this pod can reach (one process: `default`)."""
    return Path(os.environ.get(SHARED_DIR_ENV) or default)


def decoder_blocks(model: Any) -> list[Any]:
    """The model's repeated blocks (transformers' `_no_split_modules`: LlamaDecoderLayer, ...),
    each one FSDP unit."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(loss_module: Any, model: Any, device: Any, world: int, cpu_offload: bool) -> None:
    """Shard `model` (inside `loss_module`, the root unit) across the `world` processes of the
    initialized process group, in place; parameters move to `device`, or stay in host memory
    with `cpu_offload` on a GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if cpu_offload and device.type == "cuda":
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(loss_module, **kwargs)


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm_(params: list[Any], max_norm: float, device: Any) -> float:
    """torch.nn.utils.clip_grad_norm_ over sharded gradients: the global L2 norm from each
    rank's shards (FSDP's full sharding keeps every element on exactly one rank).

    Not torch's own, though it takes DTensor gradients: with `cpuOffload` the gradient shards
    live in host memory, and its norm all-reduces them there through the NCCL-only process
    group, which fails (pytorch/pytorch#148532, torchtune#1977); this one reduces the norm on
    the training device."""
    import torch
    import torch.distributed as dist

    grads = [_local(p.grad) for p in params if p.grad is not None]
    local = sum(
        (g.detach().float().pow(2).sum().to(device) for g in grads),
        torch.zeros((), device=device),
    )
    dist.all_reduce(local)
    norm = float(local.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return norm


def _full(p: Any) -> Any:
    """The whole tensor of a sharded parameter (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p.detach()
    local = p.to_local()
    mesh_device = p.device_mesh.device_type
    if local.device.type != mesh_device:  # offloaded to host memory
        p = DTensor.from_local(
            local.to(mesh_device),
            p.device_mesh,
            p.placements,
            run_check=False,
            shape=p.shape,
            stride=p.stride(),
        )
    return p.full_tensor().detach()


def gather(model: Any, plain: Any | None) -> None:
    """Every rank: the sharded weights of `model` gathered, one parameter at a time, into
    rank 0's unsharded copy `plain` (None on the other ranks)."""
    import torch

    into = dict(plain.named_parameters()) if plain is not None else {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = _full(p)
            if plain is not None:
                into[name].copy_(full.to(into[name].device))


class OnDevice:
    """An evaluator whose model lives in host memory between evaluations: moved to the
    training device for each run (GPU memory holds it only while rank 0 evaluates)."""

    def __init__(self, inner: Any, device: Any) -> None:
        self.inner = inner
        self.device = device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        with on_device(model, self.device):
            return self.inner.run(model, *args, **kwargs)


@contextlib.contextmanager
def on_device(model: Any, device: Any) -> Iterator[Any]:
    if device.type == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


def _state_dict(loss_module: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(loss_module),
        "optimizer": get_optimizer_state_dict(loss_module, optimizer),
    }


def save(loss_module: Any, optimizer: Any, path: Path) -> None:
    """Every rank: its shards of the weights and optimizer state into the DCP folder `path`
    (rank 0 writes the metadata). Names are the loss module's, whatever the process count."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dict(loss_module, optimizer), checkpoint_id=str(path))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _METADATA_GLOBALS.get(module, set())
        dtype = module == "torch" and _is_dtype(name)
        if allowed is not None and name not in allowed and not dtype:
            raise IntegrityError(
                f"checkpoint metadata names {module}.{name}, which a sharded checkpoint never "
                "holds (refused, nothing in it was run)"
            )
        return super().find_class(module, name)


def _is_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def _read_metadata(path: Path) -> Any:
    with open(path / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = _read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _planner() -> Any:
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        """DCP's planner, with non-tensor values (the optimizer's hyper-parameters) loaded as
        plain values only."""

        refused: IntegrityError | None = None

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                # DCP wraps what a planner raises; load() raises this one
                self.refused = IntegrityError(
                    f"checkpoint value {read_item.dest_index.fqn} holds more than plain "
                    f"values (refused, nothing in it was run): {str(exc).splitlines()[0]}"
                )
                raise self.refused from None
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafePlanner()


def load(loss_module: Any, optimizer: Any, path: Path) -> None:
    """Every rank: its shards of the weights and optimizer state from the DCP folder `path`,
    whichever number of processes wrote it (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _read_metadata(path)  # IntegrityError before DCP (which wraps errors) reads anything
    state = _state_dict(loss_module, optimizer)
    planner = _planner()
    try:
        dcp.load(state, storage_reader=_reader(path), planner=planner)
    except Exception:
        if planner.refused is not None:
            raise planner.refused from None
        raise
    set_model_state_dict(loss_module, state["model"])
    set_optimizer_state_dict(loss_module, optimizer, state["optimizer"])


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def training_state_bytes(params: list[Any], optimizer: Any) -> int:
    """This process's bytes of trainable weights, their gradients and the optimizer state
    (its shards of them when sharded): what sharding divides."""
    import torch

    def size(t: Any) -> int:
        t = _local(t)
        return int(t.numel() * t.element_size())

    total = sum(size(p) + (size(p.grad) if p.grad is not None else 0) for p in params)
    for per_param in optimizer.state.values():
        total += sum(size(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    return total
