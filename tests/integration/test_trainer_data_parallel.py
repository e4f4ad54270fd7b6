"""Data parallelism in one pod (`resources.gpu > 1`), exercised on the CPU: two processes
(gloo instead of NCCL, forced by GRAFT_DATA_PARALLEL) share each step's micro-batches, so an
epoch takes half the optimizer steps, and train what one process accumulating the same
micro-batches trains; only the main process evaluates and writes outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from graft.storage import latest_complete_checkpoint, read_manifest
from graft_trainer.errors import EXIT_INVALID
from tests.integration.trainer_kit import job_document, run_trainer_pod, shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

# 240 train records at 16 per micro-batch: 15 micro-batches per epoch.
TRAINING = {"maxSteps": None, "epochs": 1, "evalSteps": 4, "saveSteps": 4, "loggingSteps": 2}


@pytest.fixture(scope="session")
def kit() -> dict[str, Path]:
    return shared_kit()


def run_pod(doc: dict[str, Any], uri: str, tmp_path: Path, processes: int) -> int:
    # Whole micro-batches in every run (graft_trainer.memory: several processes always run
    # them whole; one process would split them at the token budget, the same sums in another
    # order, which a few training steps amplify past these tests' 1e-3).
    env = {"GRAFT_DATA_PARALLEL": str(processes), "OMP_NUM_THREADS": "1", "GRAFT_TOKEN_BUDGET": "0"}
    return run_trainer_pod(doc, uri, tmp_path, **env).returncode


def test_two_processes_share_each_step_and_one_writes_the_outputs(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/out/"
    doc = job_document(kit, name="ddp", training=TRAINING)
    assert run_pod(doc, uri, tmp_path, processes=2) == 0
    manifest = read_manifest(uri)
    assert manifest is not None
    run = manifest["run"]
    assert run["processes"] == 2
    # 15 micro-batches, 2 per optimizer step: 8 steps (a single process takes 15).
    assert run["totalSteps"] == run["finalStep"] == 8
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["final"]["eval_loss"] < metrics["baseline"]["eval_loss"]
    # Train loss and tokens/s are over both processes' shares (logged every 2 steps).
    assert [h["step"] for h in metrics["history"] if "train_loss" in h] == [2, 4, 6, 8]

    # One process accumulating the same two micro-batches per step trains the same model.
    single_uri = f"file://{tmp_path}/single/"
    single_doc = job_document(
        kit, name="ddp", training={**TRAINING, "gradientAccumulationSteps": 2}
    )
    assert run_pod(single_doc, single_uri, tmp_path, processes=1) == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert single["run"]["processes"] == 1 and single["run"]["finalStep"] == 8
    assert single["run"]["tokens"] == metrics["run"]["tokens"]
    losses = [h["train_loss"] for h in metrics["history"] if "train_loss" in h]
    single_losses = [h["train_loss"] for h in single["history"] if "train_loss" in h]
    assert losses == pytest.approx(single_losses, rel=1e-3)
    assert metrics["final"]["eval_loss"] == pytest.approx(single["final"]["eval_loss"], rel=1e-3)
    # A checkpoint (every 4 steps, before the last) was written by the main process and says
    # how many processes made it.
    found = latest_complete_checkpoint(uri + "checkpoints/")
    assert found is not None and found[1]["processes"] == 2 and found[1]["step"] == 4


def test_invalid_input_in_every_process_still_exits_as_invalid(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/out/"
    doc = job_document(kit, name="ddp-bad", dataset={"uri": f"file://{tmp_path}/missing.jsonl"})
    assert run_pod(doc, uri, tmp_path, processes=2) == EXIT_INVALID
    assert read_manifest(uri) is None


def test_a_checkpoint_of_another_process_count_is_not_resumed(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    uri = f"file://{tmp_path}/out/"
    doc = job_document(kit, name="ddp-resume", training={**TRAINING, "evalSteps": 100})
    assert run_pod(doc, uri, tmp_path, processes=2) == 0
    # The same job again with one process: its step counts mean other micro-batches.
    assert run_pod(doc, uri, tmp_path, processes=1) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["run"]["processes"] == 1 and metrics["run"]["resumedFrom"] is None
    assert metrics["run"]["finalStep"] == 15
    assert any("made by 2 training processes" in w["message"] for w in metrics["warnings"])
