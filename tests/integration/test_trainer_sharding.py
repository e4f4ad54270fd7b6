"""Sharded full fine-tunes (`training.sharding.strategy: fsdp`), exercised on the CPU: two
processes (gloo, forced by GRAFT_DATA_PARALLEL) shard the weights, gradients and optimizer
state with FSDP and train what one unsharded process accumulating the same micro-batches
trains (with activation checkpointing, training.gradientCheckpointing); their sharded
checkpoint resumes with two processes, and resharded with one; the published model is the
whole Hugging Face model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from graft.storage import latest_complete_checkpoint, read_manifest
from tests.integration.trainer_kit import job_document, run_trainer_pod, shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

# Two micro-batches of 16 per optimizer step; a checkpoint at step 3 of 6.
TRAINING = {
    "maxSteps": 6,
    "perDeviceTrainBatchSize": 16,
    "learningRate": 1.0e-3,
    "loggingSteps": 1,
    "evalSteps": 3,
    "saveSteps": 3,
}


@pytest.fixture(scope="session")
def kit() -> dict[str, Path]:
    return shared_kit()


def run_pod(doc: dict[str, Any], uri: str, tmp_path: Path, processes: int, **env: str) -> int:
    # Whole micro-batches in every run (graft_trainer.memory: several processes always run
    # them whole; one process would split them at the token budget, the same sums in another
    # order, which a few training steps amplify past these tests' 1e-3).
    env = {
        "GRAFT_DATA_PARALLEL": str(processes),
        "OMP_NUM_THREADS": "1",
        "GRAFT_TOKEN_BUDGET": "0",
        **env,
    }
    return run_trainer_pod(doc, uri, tmp_path, **env).returncode


def losses(metrics: dict[str, Any]) -> dict[int, float]:
    return {h["step"]: h["train_loss"] for h in metrics["history"] if "train_loss" in h}


def state_bytes(metrics: dict[str, Any]) -> int:
    return next(
        h["training_state_bytes_per_process"]
        for h in metrics["history"]
        if "training_state_bytes_per_process" in h
    )


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


def test_fsdp_matches_one_process_and_its_checkpoint_resumes_with_two_or_one(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    # The reference: one unsharded process accumulating both micro-batches of each step.
    single_doc = job_document(
        kit, name="fsdp", method="full", lora=None,
        training={**TRAINING, "gradientAccumulationSteps": 2},
    )  # fmt: skip
    assert run_pod(single_doc, f"file://{tmp_path}/single/", tmp_path, processes=1) == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert single["run"]["finalStep"] == 6

    # Two sharded processes, killed (SIGKILL of rank 0) right after the checkpoint of step 3;
    # with activation checkpointing (it recomputes, the losses stay the same).
    doc = job_document(
        kit, name="fsdp", method="full", lora=None,
        training={**TRAINING, "gradientCheckpointing": True, "sharding": {"strategy": "fsdp"}},
    )  # fmt: skip
    uri = f"file://{tmp_path}/out/"
    killed = run_pod(doc, uri, tmp_path, processes=2, GRAFT_FAULT_KILL_AFTER_CHECKPOINT="1")
    assert killed != 0 and read_manifest(uri) is None
    found = latest_complete_checkpoint(uri + "checkpoints/")
    assert found is not None
    ckpt_uri, ckpt = found
    assert ckpt["step"] == 3 and ckpt["processes"] == 2 and ckpt["format"] == "sharded"
    assert ckpt["microBatchesPerStep"] == 2
    files = set(ckpt["files"])
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= files
    assert "trainable.pt" not in files and "optimizer.pt" not in files
    shutil.copytree(tmp_path / "out", tmp_path / "reshard")  # the same checkpoint, twice

    # Rerun with two processes: resumes at step 3 and finishes.
    assert run_pod(doc, uri, tmp_path, processes=2) == 0
    fsdp = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert fsdp["run"]["processes"] == 2
    assert fsdp["run"]["resumedFrom"] == 3 and fsdp["run"]["finalStep"] == 6
    # Every step's loss (steps 1-3 before the kill, 4-6 after) and the final eval loss are
    # the unsharded run's, and so is the published model: whole, not shards.
    assert sorted(losses(fsdp)) == list(range(1, 7))
    assert list(losses(fsdp).values()) == pytest.approx(list(losses(single).values()), rel=1e-3)
    assert fsdp["final"]["eval_loss"] == pytest.approx(single["final"]["eval_loss"], rel=1e-3)
    published, reference = weights(tmp_path / "out"), weights(tmp_path / "single")
    assert published.keys() == reference.keys()
    for name, tensor in reference.items():
        assert published[name].shape == tensor.shape, name
        assert (published[name] - tensor).abs().max() < 1e-3, name
    # Each process holds about half the weights, gradients and optimizer state.
    ratio = state_bytes(fsdp) / state_bytes(single)
    print(f"training state per process, FSDP(2) / unsharded: {ratio:.3f}")
    assert 0.45 < ratio < 0.6

    # The same 2-process checkpoint resumed by one process: resharded on load, each step
    # still two micro-batches, the same losses.
    reshard_uri = f"file://{tmp_path}/reshard/"
    assert run_pod(doc, reshard_uri, tmp_path, processes=1) == 0
    one = json.loads((tmp_path / "reshard" / "metrics.json").read_text())
    assert one["run"]["processes"] == 1
    assert one["run"]["resumedFrom"] == 3 and one["run"]["finalStep"] == 6
    assert one["run"]["tokens"] == single["run"]["tokens"]
    assert list(losses(one).values()) == pytest.approx(list(losses(single).values()), rel=1e-3)
    assert one["final"]["eval_loss"] == pytest.approx(single["final"]["eval_loss"], rel=1e-3)
    assert ckpt_uri.startswith(uri)
