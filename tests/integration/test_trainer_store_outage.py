"""A real training run (the trainer pod's own process) whose S3 store goes down for 30 s twice:
just before a checkpoint upload and as the outputs are written. With the default retry budget
(GRAFT_STORE_RETRY_SECONDS, 180 s) the run neither fails nor restarts: it ends with exit 0, its
checkpoints and outputs complete and verified, and nothing visible without its manifest."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from graft.storage import S3Store, download_artifact, latest_complete_checkpoint, read_manifest
from tests.integration.operator_kit import free_port
from tests.integration.trainer_kit import job_document, shared_kit, start_trainer_pod

pytestmark = [pytest.mark.faults, pytest.mark.trainer, pytest.mark.timeout(600)]

OUTAGE_SECONDS = 30.0
# The last step's weights go to the outputs, not to a checkpoint.
TRAINING = {"maxSteps": 20, "saveSteps": 10, "evalSteps": 10, "loggingSteps": 1}


class Outages:
    """Stops the store when asked and starts it again OUTAGE_SECONDS later."""

    def __init__(self, server: ThreadedMotoServer) -> None:
        self.server = server
        self.spans: list[tuple[str, float, float]] = []  # (when, stopped at, started at)
        self.timers: list[threading.Timer] = []

    def start(self, when: str) -> None:
        stopped = time.monotonic()
        self.server.stop()

        def back() -> None:
            self.server.start()
            self.spans.append((when, stopped, time.monotonic()))

        timer = threading.Timer(OUTAGE_SECONDS, back)
        timer.start()
        self.timers.append(timer)

    def join(self) -> None:
        for timer in self.timers:
            timer.join(OUTAGE_SECONDS + 10)


def test_a_run_rides_out_two_store_outages_without_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    store_env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "GRAFT_S3_CONNECT_TIMEOUT": "1",
    }
    for key, value in store_env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=store_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="runs")
    uri = "s3://runs/team-a/outage/"
    doc = job_document(shared_kit(), name="outage", training=TRAINING)
    monkeypatch.delenv("GRAFT_STORE_RETRY_SECONDS", raising=False)  # the default budget
    outages = Outages(server)
    began = time.monotonic()
    proc = start_trainer_pod(doc, uri, tmp_path, **store_env)
    assert proc.stdout is not None
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        for line in proc.stdout:
            record: dict[str, Any] = json.loads(line) if line.startswith("{") else {}
            step = int((record.get("progress") or {}).get("step") or 0)
            if step >= 8 and not outages.timers:
                outages.start("before the checkpoint of step 10")
            if record.get("stage") == "exporting" and len(outages.timers) == 1:
                outages.start("as the outputs are written")
        code = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        outages.join()
    took = time.monotonic() - began
    reader.join(10)
    try:
        assert code == 0, "".join(stderr_lines)[-3000:]
        assert [when for when, _, _ in outages.spans] == [
            "before the checkpoint of step 10",
            "as the outputs are written",
        ]
        assert took >= 2 * OUTAGE_SECONDS  # the run really waited for the store, twice
        # Everything arrived complete and verifies: the checkpoint and the outputs.
        found = latest_complete_checkpoint(uri + "checkpoints/")
        assert found is not None and found[1]["step"] == 10, found
        manifest = read_manifest(uri)
        assert manifest is not None and manifest["files"], manifest
        fetched, _ = download_artifact(uri, tmp_path / "fetched", store=S3Store())
        metrics = json.loads((fetched / "metrics.json").read_text())
        assert metrics["run"]["finalStep"] == 20 and not metrics["run"]["resumedFrom"]
    finally:
        server.stop()
