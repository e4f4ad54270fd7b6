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


def test_the_memory_estimate_of_a_sharded_spec_is_per_gpu() -> None:
    from transformers import LlamaConfig

    from graft.api import FineTuneJobSpec
    from graft_trainer.preflight import estimate_memory, meta_model

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=16,
        vocab_size=32000,
    )
    model = meta_model(config, False)

    def spec(method: str = "full", **sharding: object) -> FineTuneJobSpec:
        training: dict[str, object] = {"perDeviceTrainBatchSize": 1}
        if sharding:
            training["sharding"] = sharding
        return FineTuneJobSpec.model_validate(
            {
                "model": {"uri": "s3://m/x/"},
                "dataset": {"uri": "s3://d/p.jsonl", "textTemplate": "{a}", "maxSeqLength": 256},
                "method": method,
                "training": training,
            }
        )

    whole = estimate_memory(spec(), model, config, "bf16", processes=4)
    sharded = estimate_memory(spec(strategy="fsdp"), model, config, "bf16", processes=4)
    offloaded = estimate_memory(
        spec(strategy="fsdp", cpuOffload=True), model, config, "bf16", processes=4
    )
    assert "shardedOver" not in whole and sharded["shardedOver"] == 4
    assert sharded["weightsBytes"] == whole["weightsBytes"] // 4
    assert sharded["optimizerBytes"] == whole["optimizerBytes"] // 4
    # weights + gradients + AdamW are 4x the weights: a quarter of each leaves about the
    # whole weights (rank 0's evaluation copy) plus a quarter of the rest
    assert offloaded["estimatedBytes"] < sharded["estimatedBytes"] < whole["estimatedBytes"] * 0.6
    one = estimate_memory(spec(strategy="fsdp"), model, config, "bf16", processes=1)
    assert one["estimatedBytes"] == estimate_memory(spec(), model, config, "bf16")["estimatedBytes"]
