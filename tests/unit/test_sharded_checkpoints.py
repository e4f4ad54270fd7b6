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


class _Checkpoints:
    def __init__(self, manifest: dict[str, object]) -> None:
        self.manifest = manifest
        self.job_manifest = {"specDigest": manifest["specDigest"]}

    def latest(self) -> tuple[str, dict[str, object]]:
        return "file:///c/step-00000004/", self.manifest


@pytest.mark.parametrize(
    ("made_by", "per_step", "world", "kept"),
    [(2, 2, 2, None), (2, 2, 1, 2), (4, 8, 2, 8), (2, 2, 3, "refused")],
)
def test_a_sharded_checkpoint_resumes_with_a_process_count_dividing_its_step(
    tmp_path: Path, made_by: int, per_step: int, world: int, kept: object
) -> None:
    from graft.api import FineTuneJobSpec
    from graft_trainer.engine import Engine, JobIdentity

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "s3://m/x/"},
            "dataset": {"uri": "s3://d/p.jsonl", "textTemplate": "{a}"},
            "method": "full",
            "training": {"sharding": {"strategy": "fsdp"}},
        }
    )
    engine = Engine(spec, JobIdentity("x"), f"file://{tmp_path}/", reporter=None)  # type: ignore[arg-type]
    manifest = {
        "specDigest": "d",
        "processes": made_by,
        "microBatchesPerStep": per_step,
        "format": "sharded",
    }
    point, adopted = engine._resume_point(_Checkpoints(manifest), world)  # type: ignore[arg-type]
    if kept == "refused":
        assert point is None and adopted is None
        [warning] = engine.warnings
        assert "made by 2 training processes, this run has 3" in warning.message
        assert "cannot share its 2 micro-batches per step evenly" in warning.message
    else:
        assert point is not None and adopted == kept and engine.warnings == []
    # A data-parallel (unsharded) checkpoint of another process count is never resumed.
    manifest.pop("format")
    if made_by != world:
        assert engine._resume_point(_Checkpoints(manifest), world) == (None, None)  # type: ignore[arg-type]
