"""An S3 outage is waited out, not turned into a failed pod: an artifact published while the
server is down for a few seconds lands complete once it is back (files, then the manifest), and
reads back verified. A real moto server is stopped and started again."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from graft.storage import S3Store, StoreError, download_artifact, read_manifest, write_artifact

pytestmark = [pytest.mark.faults, pytest.mark.integration]

OUTAGE_SECONDS = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_publish_during_an_outage_completes_when_the_store_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "GRAFT_S3_CONNECT_TIMEOUT": "1",
        "GRAFT_S3_MAX_ATTEMPTS": "1",
        "GRAFT_STORE_RETRY_SECONDS": "60",
    }.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="outage"
    )
    local = tmp_path / "adapter"
    local.mkdir()
    (local / "adapter_model.safetensors").write_bytes(b"w" * 100_000)
    (local / "adapter_config.json").write_text('{"r": 8}')
    uri = "s3://outage/team-a/adapter/"

    server.stop()  # the store goes down
    restarted = threading.Timer(OUTAGE_SECONDS, server.start)
    restarted.start()
    try:
        began = time.monotonic()
        write_artifact(local, uri, {"kind": "adapter"}, store=S3Store())
        waited = time.monotonic() - began
        assert waited >= OUTAGE_SECONDS - 0.5, f"published in {waited:.1f} s while down?"
        manifest = read_manifest(uri)
        assert manifest is not None and set(manifest["files"]) == {
            "adapter_model.safetensors",
            "adapter_config.json",
        }
        folder, _ = download_artifact(uri, tmp_path / "back")
        assert (folder / "adapter_model.safetensors").read_bytes() == b"w" * 100_000

        # A store that stays down past the budget fails (transient: a new pod may try again).
        server.stop()
        monkeypatch.setenv("GRAFT_STORE_RETRY_SECONDS", "2")
        with pytest.raises(StoreError, match="cannot reach the S3 store"):
            S3Store().write_bytes("s3://outage/team-a/x", b"x")
    finally:
        restarted.cancel()
        server.stop()
