"""A run killed (SIGKILL) right after a checkpoint resumes from it and ends at the same step,
with the local store and with the S3 server."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from graft.api.kinds import FineTuneJob, parse_object
from graft.storage import latest_complete_checkpoint, read_manifest
from graft_trainer.engine import Engine, JobIdentity, RunResult
from graft_trainer.reporting import NullReporter
from tests.integration.trainer_kit import (
    job_document,
    run_trainer_pod,
    shared_kit,
    start_trainer_pod,
)

pytestmark = [pytest.mark.faults, pytest.mark.trainer, pytest.mark.timeout(600)]

TRAINING = {"maxSteps": 30, "saveSteps": 10, "evalSteps": 10, "loggingSteps": 5}


@pytest.fixture(scope="session")
def kit() -> dict[str, Path]:
    return shared_kit()


def run_in_process(doc: dict[str, Any], uri: str) -> RunResult:
    job = parse_object(doc)
    assert isinstance(job, FineTuneJob)
    return Engine(job.spec, JobIdentity(job.metadata.name), uri, NullReporter()).run()


def killed_run(doc: dict[str, Any], uri: str, tmp_path: Path, env: dict[str, str]) -> int:
    """Start graft-trainer in a pod-like process that SIGKILLs itself after checkpoint 1."""
    return run_trainer_pod(
        doc, uri, tmp_path, **env, GRAFT_FAULT_KILL_AFTER_CHECKPOINT="1"
    ).returncode


def check_resume(doc: dict[str, Any], uri: str, tmp_path: Path, env: dict[str, str]) -> None:
    code = killed_run(doc, uri, tmp_path, env)
    assert code == -signal.SIGKILL
    found = latest_complete_checkpoint(uri + "checkpoints/")
    assert found is not None and found[1]["step"] == 10
    assert read_manifest(uri) is None  # the killed run left no output manifest
    resumed = run_in_process(doc, uri)
    assert resumed.resumed_from == 10
    assert resumed.final_step == resumed.total_steps == 30
    assert read_manifest(uri) is not None
    # The same job without interruption ends at the same step with (nearly) the same model.
    fresh = run_in_process(doc, uri.rstrip("/") + "-fresh/")
    assert fresh.resumed_from is None and fresh.final_step == 30
    assert resumed.final["eval_loss"] == pytest.approx(fresh.final["eval_loss"], rel=1e-3)
    # the resumed run's history covers the steps before the kill too
    assert [h["step"] for h in resumed.history if "train_loss" in h] == [5, 10, 15, 20, 25, 30]


def train_loss_steps(event_file: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_file))
    events.Reload()
    return [e.step for e in events.Scalars("train/train_loss")]


def test_resume_after_kill_local(kit: dict[str, Path], tmp_path: Path) -> None:
    doc = job_document(kit, name="resume-local", training=TRAINING)
    check_resume(doc, f"file://{tmp_path}/out/", tmp_path, {})
    # TensorBoard was live: the killed attempt's event file was uploaded with its checkpoint
    # (steps up to 10), the resumed attempt's holds only what came after.
    live = sorted((tmp_path / "out" / "tensorboard" / "live").glob("events.out.tfevents.*"))
    assert sorted(train_loss_steps(f) for f in live) == [[5, 10], [15, 20, 25, 30]]
    (final,) = (tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*")
    assert train_loss_steps(final) == [5, 10, 15, 20, 25, 30]


def test_resume_after_kill_s3(
    kit: dict[str, Path], tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3.bucket}/trainer-tests/{uuid.uuid4().hex[:8]}/"
    doc = job_document(kit, name="resume-s3", training=TRAINING)
    check_resume(doc, uri, tmp_path, s3.env())
    keys = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=uri.split("/", 3)[3])
    names = {o["Key"].rsplit("/", 1)[-1] for o in keys.get("Contents", [])}
    assert {"manifest.json", "report.html", "metrics.json", "adapter_model.safetensors"} <= names


def test_sigterm_checkpoints_the_current_step_and_the_next_run_redoes_nothing(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    """A pod deleted mid-training (suspend, eviction, spot reclaim): SIGTERM, then the trainer
    finishes its step, saves a checkpoint of it and exits 143 well within the grace period."""
    training = {"maxSteps": 200, "saveSteps": 1000, "evalSteps": 1000, "loggingSteps": 1}
    doc = job_document(kit, name="sigterm", training=training)
    uri = f"file://{tmp_path}/out/"
    proc = start_trainer_pod(doc, uri, tmp_path)
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:  # progress events, one JSON object per line
        record = json.loads(line) if line.startswith("{") else {}
        seen = int((record.get("progress") or {}).get("step") or 0)
        if seen >= 5:
            break
    assert seen >= 5, "training never reported step 5"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped on SIGTERM at step" in stderr
    found = latest_complete_checkpoint(uri + "checkpoints/")
    assert found is not None, "no checkpoint saved on SIGTERM"
    saved = int(found[1]["step"])
    # the step it was in when the signal came, or the one after: nothing earlier is lost
    assert seen <= saved <= seen + 2, (seen, saved)
    assert took < 60, f"took {took:.1f} s to stop"
    assert read_manifest(uri) is None  # stopped, not finished: no output manifest
    resumed = run_in_process(doc, uri)
    assert resumed.resumed_from == saved and resumed.final_step == 200
