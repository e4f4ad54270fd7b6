"""The operator's pre-flight pod (`graft-trainer preflight-resource`): a GPU FineTuneJob's
checks that need no GPU, run on the CPU. What it finds is the resource's Validated message;
what it refuses ends the resource before a GPU is requested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graft_trainer.__main__ import check_for_gpu_pod
from graft_trainer.errors import EXIT_INVALID, EXIT_OK
from tests.integration.trainer_kit import job_document, shared_kit

pytestmark = [pytest.mark.trainer]


def test_a_gpu_job_is_checked_on_a_machine_without_one(tmp_path: Path) -> None:
    doc = job_document(shared_kit(), resources={"gpu": 1})
    code, findings = check_for_gpu_pod(doc, tmp_path.as_uri() + "/out/")
    assert code == EXIT_OK, findings
    # The stratified 80/20 split of the kit's 300 records, the model, and the estimate.
    assert findings.startswith("pre-flight passed in a CPU pod: 240 training and 60 evaluation")
    assert "LlamaForCausalLM" in findings and "lora on q_proj" in findings
    assert "estimated peak memory" in findings and "at bf16" in findings


def test_bad_input_is_refused_naming_the_field(tmp_path: Path) -> None:
    kit = shared_kit()
    doc = job_document(
        kit, resources={"gpu": 1}, dataset={"textTemplate": "{phrase} -> {sentiment_score} {tone}"}
    )
    code, message = check_for_gpu_pod(doc, tmp_path.as_uri() + "/out/")
    assert code == EXIT_INVALID
    assert "{sentiment_score}" in message and "missing" in message
    missing_model = job_document(
        kit, resources={"gpu": 1}, model={"uri": f"file://{tmp_path}/none"}
    )
    code, message = check_for_gpu_pod(missing_model, tmp_path.as_uri() + "/out/")
    assert code == EXIT_INVALID and "no such directory" in message


def test_the_pod_command_exits_with_the_contracts_codes(tmp_path: Path) -> None:
    doc = job_document(shared_kit(), resources={"gpu": 1}, dataset={"trainSplit": "nope"})
    path = tmp_path / "resource.json"
    path.write_text(json.dumps(doc))
    done = subprocess.run(
        [sys.executable, "-m", "graft_trainer", "preflight-resource", str(path)],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1",
            "GRAFT_ARTIFACTS_URI": tmp_path.as_uri() + "/out/",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "stratifyBy needs trainSplit and evalSplit" in done.stderr
