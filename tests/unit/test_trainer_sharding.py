"""Sharded checkpoints (graft_trainer.sharding) without processes: a DCP folder saved and read
back through the reader that runs no code, and a metadata file naming anything else refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from graft.storage import IntegrityError
from graft_trainer import sharding


def _module_and_optimizer(seed: int) -> tuple[object, object]:
    import torch

    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return module, optimizer


def test_a_sharded_checkpoint_round_trips_through_the_safe_reader(tmp_path: Path) -> None:
    import torch

    saved, saved_opt = _module_and_optimizer(0)
    sharding.save(saved, saved_opt, tmp_path / "sharded")
    loaded, loaded_opt = _module_and_optimizer(1)
    sharding.load(loaded, loaded_opt, tmp_path / "sharded")
    for a, b in zip(saved.parameters(), loaded.parameters(), strict=True):  # type: ignore[attr-defined]
        assert torch.equal(a, b)
    a_state = saved_opt.state_dict()  # type: ignore[attr-defined]
    b_state = loaded_opt.state_dict()  # type: ignore[attr-defined]
    assert torch.equal(a_state["state"][0]["exp_avg"], b_state["state"][0]["exp_avg"])
    assert a_state["param_groups"][0]["lr"] == b_state["param_groups"][0]["lr"]
    assert sharding.training_state_bytes(list(loaded.parameters()), loaded_opt) > 0  # type: ignore[attr-defined]


class _Runs:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("true",))


def test_metadata_naming_anything_else_is_refused_unrun(tmp_path: Path) -> None:
    saved, saved_opt = _module_and_optimizer(0)
    sharding.save(saved, saved_opt, tmp_path / "sharded")
    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(_Runs()))
    loaded, loaded_opt = _module_and_optimizer(1)
    with pytest.raises(IntegrityError, match=r"system.*refused, nothing in it was run"):
        sharding.load(loaded, loaded_opt, tmp_path / "sharded")
