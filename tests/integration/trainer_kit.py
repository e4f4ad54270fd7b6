"""Helpers for the trainer tests: a FineTuneJob document on the tiny-model kit, and the
trainer pod's command run as a child process."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TEMPLATE = "<|user|>\n{phrase}<|end|>\n<|assistant|>\n{tone}<|end|>"


def job_document(kit: dict[str, Path], name: str = "tone", **spec_overrides: Any) -> dict[str, Any]:
    """A small LoRA job on the kit; `training`/`dataset`/... overrides are merged one level."""
    spec: dict[str, Any] = {
        "model": {"uri": f"file://{kit['model']}"},
        "dataset": {
            "uri": f"file://{kit['dataset']}",
            "trainSplit": "train[:80%]",
            "evalSplit": "train[80%:]",
            "stratifyBy": "tone",
            "textTemplate": TEMPLATE,
            "completionOnly": True,
            "maxSeqLength": 64,
        },
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "maxSteps": 40,
            "learningRate": 1.0e-2,
            "warmupRatio": 0.05,
            "perDeviceTrainBatchSize": 16,
            "loggingSteps": 10,
            "evalSteps": 20,
            "saveSteps": 1000,
        },
        "evaluation": {"metrics": ["loss", "perplexity"], "labelField": "tone", "maxNewTokens": 4},
    }
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        elif value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": "0123abcd-0000-0000-0000-000000000000",
        },
        "spec": copy.deepcopy(spec),
    }


@functools.lru_cache(maxsize=1)
def shared_kit() -> dict[str, Path]:
    """The tiny model and data, built once per test session (seconds) into a temp folder."""
    from graft_trainer.testkit import build_kit

    return build_kit(Path(tempfile.mkdtemp(prefix="graft-kit-")), n=300)


def pod_invocation(
    doc: dict[str, Any], uri: str, work: Path, **env: str
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a trainer pod running `doc` (written to `work`),
    offline, writing to `uri`, with `env` on top of the pod's variables."""
    path = work / f"{doc['metadata']['name']}.json"
    path.write_text(json.dumps(doc))
    full_env = {**os.environ, "GRAFT_ARTIFACTS_URI": uri, "HF_HUB_OFFLINE": "1", **env}
    return [sys.executable, "-m", "graft_trainer", "run-resource", str(path)], full_env


def run_trainer_pod(
    doc: dict[str, Any], uri: str, work: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """`graft-trainer run-resource` in a child process, as the trainer pod runs it (offline,
    no status reporter), with `env` on top of the pod's variables."""
    args, full_env = pod_invocation(doc, uri, work, **{"GRAFT_REPORTER": "none", **env})
    return subprocess.run(
        args,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=500,
    )


def start_trainer_pod(
    doc: dict[str, Any], uri: str, work: Path, **env: str
) -> subprocess.Popen[str]:
    """`graft-trainer run-resource` started as the trainer pod runs it, its progress events as
    JSON lines on stdout (GRAFT_REPORTER=jsonl) for a test to act on while it trains."""
    args, full_env = pod_invocation(doc, uri, work, **{"GRAFT_REPORTER": "jsonl", **env})
    return subprocess.Popen(
        args,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
