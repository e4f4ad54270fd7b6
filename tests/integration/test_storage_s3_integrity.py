"""Against the S3 server: an object key that climbs out of its prefix never lands outside the
download folder, and a changed object is refused by its artifact's manifest."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from graft.storage import IntegrityError, S3Store, download_artifact, download_dir, write_artifact

pytestmark = pytest.mark.integration


@pytest.fixture
def store(s3: Any, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return S3Store()


def test_a_key_with_dotdot_is_refused_and_nothing_is_written(
    s3: Any, store: S3Store, tmp_path: Path
) -> None:
    prefix = f"integrity/{uuid.uuid4().hex[:8]}/data/"
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key=prefix + "ok.txt", Body=b"fine")
    client.put_object(Bucket=s3.bucket, Key=prefix + "../../../escape.txt", Body=b"owned")
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["Contents"]]
    assert prefix + "../../../escape.txt" in listed  # the server keeps the key as written
    root = tmp_path / "a" / "b" / "c"
    with pytest.raises(IntegrityError, match=r"'\.\./\.\./\.\./escape\.txt'.*refused"):
        download_dir(f"s3://{s3.bucket}/{prefix}", root, store=store)
    assert not list(tmp_path.rglob("escape.txt"))
    assert not root.exists()  # refused before anything was written


def test_an_object_changed_under_its_manifest_is_refused(
    s3: Any, store: S3Store, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"\x00" * 32)
    uri = f"s3://{s3.bucket}/integrity/{uuid.uuid4().hex[:8]}/adapter/"
    write_artifact(src, uri, {"kind": "adapter"}, store=store)
    local, _ = download_artifact(uri, tmp_path / "first", store=store)
    assert (local / "adapter_model.safetensors").read_bytes() == b"\x00" * 32
    key = uri.split("/", 3)[3] + "adapter_model.safetensors"
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=b"\x07" * 32)
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors does not match"):
        download_artifact(uri, tmp_path / "second", store=store)
