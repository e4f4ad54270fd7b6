"""The shared download cache (graft_trainer.cache) against the S3 server: pods filling the same
entry at once, a model replaced in the store, and a tampered entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from graft.storage import IntegrityError, open_store, write_artifact
from graft_trainer.cache import cached_artifact, cached_objects

pytestmark = [pytest.mark.trainer]

FILL = """
import json, os, sys, time
from graft.storage import open_store
from graft_trainer.cache import cached_artifact
start = sys.argv[2]
while not os.path.exists(start):
    time.sleep(0.01)
path = cached_artifact(sys.argv[1], open_store(sys.argv[1]))
print(json.dumps({"path": str(path)}))
"""


@pytest.fixture
def store_env(s3: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return dict(s3.env())


def model_artifact(tmp_path: Path, s3: Any, size: int = 8 << 20) -> str:
    """An artifact of a few files (one of `size` bytes) under a fresh S3 prefix."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "tokenizer.json").write_text("{}")
    uri = f"s3://{s3.bucket}/cache-tests/{uuid.uuid4().hex[:8]}/model/"
    write_artifact(folder, uri, {"kind": "model"})
    return uri


def test_pods_filling_one_entry_at_once_all_get_the_whole_verified_artifact(
    tmp_path: Path, s3: Any, store_env: dict[str, str]
) -> None:
    uri = model_artifact(tmp_path, s3)
    cache, start = tmp_path / "cache", tmp_path / "start"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", FILL, uri, str(start)],
            env={**os.environ, **store_env, "GRAFT_CACHE_DIR": str(cache)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(3)  # the children have imported and wait for the start signal
    start.touch()
    paths = set()
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-2000:]
        paths.add(json.loads(out.strip().splitlines()[-1])["path"])
    (path,) = paths
    entries = list((cache / "artifacts").iterdir())
    assert [e.name for e in entries] == [Path(path).name], "staging folders were left behind"
    # Whole and as the manifest says (a torn file would fail its digest here).
    assert cached_artifact(uri, open_store(uri), root=cache) == Path(path)
    assert (Path(path) / "model.safetensors").stat().st_size == 8 << 20


def test_a_second_fetch_reads_nothing_but_the_manifest(
    tmp_path: Path, s3: Any, store_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = model_artifact(tmp_path, s3, size=1 << 20)
    store = open_store(uri)
    downloads: list[str] = []
    real = type(store).download_file

    def counting(self: Any, source: str, path: Path) -> None:
        downloads.append(source)
        real(self, source, path)

    monkeypatch.setattr(type(store), "download_file", counting)
    first = cached_artifact(uri, store, root=tmp_path / "cache")
    assert len(downloads) == 3
    assert cached_artifact(uri, store, root=tmp_path / "cache") == first
    assert len(downloads) == 3, "the second fetch downloaded again"


def test_an_object_replaced_in_the_store_is_fetched_again_never_served_stale(
    tmp_path: Path, s3: Any, store_env: dict[str, str]
) -> None:
    """A plain folder (no manifest) and a single data file: entries are named by the objects'
    ETags, so a same-size replacement is a new entry."""
    client = s3.client()
    prefix = f"cache-tests/{uuid.uuid4().hex[:8]}/"
    client.put_object(Bucket=s3.bucket, Key=prefix + "base/weights.bin", Body=b"A" * 4096)
    client.put_object(Bucket=s3.bucket, Key=prefix + "data.jsonl", Body=b'{"t": 1}\n')
    folder_uri = f"s3://{s3.bucket}/{prefix}base/"
    file_uri = f"s3://{s3.bucket}/{prefix}data.jsonl"
    store, cache = open_store(folder_uri), tmp_path / "cache"
    before = cached_objects(folder_uri, store, root=cache)
    data_before = cached_objects(file_uri, store, root=cache)
    assert before is not None and data_before is not None
    assert (data_before / "data.jsonl").read_bytes() == b'{"t": 1}\n'
    client.put_object(Bucket=s3.bucket, Key=prefix + "base/weights.bin", Body=b"B" * 4096)
    client.put_object(Bucket=s3.bucket, Key=prefix + "data.jsonl", Body=b'{"t": 2}\n')
    after = cached_objects(folder_uri, store, root=cache)
    data_after = cached_objects(file_uri, store, root=cache)
    assert after is not None and after != before
    assert (after / "weights.bin").read_bytes() == b"B" * 4096
    assert data_after is not None and (data_after / "data.jsonl").read_bytes() == b'{"t": 2}\n'
    assert cached_objects(f"s3://{s3.bucket}/{prefix}missing.jsonl", store, root=cache) is None


def test_a_tampered_entry_is_fetched_again_and_a_tampered_store_is_refused(
    tmp_path: Path, s3: Any, store_env: dict[str, str]
) -> None:
    uri = model_artifact(tmp_path, s3, size=4096)
    store, cache = open_store(uri), tmp_path / "cache"
    entry = cached_artifact(uri, store, root=cache)
    (entry / "config.json").write_text('{"model_type": "evil"}')
    again = cached_artifact(uri, store, root=cache)
    assert (again / "config.json").read_text() == '{"model_type": "llama"}'
    # The store's own copy changed under its manifest: that is not the cache's to hide.
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=key + "config.json", Body=b"{}")
    with pytest.raises(IntegrityError, match=r"config\.json"):
        cached_artifact(uri, store, root=tmp_path / "other-cache")
