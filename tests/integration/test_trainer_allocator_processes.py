"""The trainer's commands restart under tcmalloc (graft_trainer.allocator), as processes of
their own: the pod's `graft-trainer run-resource` and `graft run`. metrics.json says which
malloc the run had. CI installs libtcmalloc-minimal4 (.ci/run), so there it must be found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from graft_trainer.allocator import find_tcmalloc
from tests.integration.trainer_kit import job_document, run_trainer_pod, shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

TRAINING = {"maxSteps": 3, "loggingSteps": 1, "evalSteps": 3}


@pytest.fixture(scope="module")
def kit() -> dict[str, Path]:
    return shared_kit()


@pytest.fixture(scope="module")
def tcmalloc() -> str:
    path = find_tcmalloc()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no tcmalloc on a CI machine: .ci/run installs libtcmalloc-minimal4")
        pytest.skip("libtcmalloc-minimal4 is not installed (make venv installs it as root)")
    return path


def run_facts(out: Path) -> dict[str, object]:
    facts: dict[str, object] = json.loads((out / "metrics.json").read_text())["run"]
    return facts


def test_the_pod_command_restarts_under_tcmalloc(
    kit: dict[str, Path], tcmalloc: str, tmp_path: Path
) -> None:
    done = run_trainer_pod(
        job_document(kit, name="malloc", training=TRAINING), f"file://{tmp_path}/out/", tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_facts(tmp_path / "out")["allocator"] == "tcmalloc"


def test_graft_allocator_system_keeps_glibc_and_a_bad_value_is_refused(
    kit: dict[str, Path], tmp_path: Path
) -> None:
    doc = job_document(kit, name="glibc", training=TRAINING)
    done = run_trainer_pod(doc, f"file://{tmp_path}/out/", tmp_path, GRAFT_ALLOCATOR="system")
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_facts(tmp_path / "out")["allocator"] == "system"
    bad = run_trainer_pod(doc, f"file://{tmp_path}/bad/", tmp_path, GRAFT_ALLOCATOR="mimalloc")
    assert bad.returncode == 2
    assert "GRAFT_ALLOCATOR='mimalloc': expected one of auto, tcmalloc, system" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_graft_run_restarts_under_tcmalloc(
    kit: dict[str, Path], tcmalloc: str, tmp_path: Path
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_document(kit, name="local", training=TRAINING)))
    graft = Path(sys.executable).parent / "graft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LD_PRELOAD", None)
    done = subprocess.run(
        [str(graft), "run", str(job), "--out", str(tmp_path / "out"), "--reporter", "none"],
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert run_facts(tmp_path / "out")["allocator"] == "tcmalloc"
