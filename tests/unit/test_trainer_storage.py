"""The storage layer on the local filesystem: artifacts with manifests written last,
checkpoint discovery, resumable directory transfers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graft.storage import (
    LocalStore,
    StoreError,
    download_dir,
    file_digest,
    latest_complete_checkpoint,
    parse_uri,
    read_manifest,
    upload_dir,
    write_artifact,
)
from graft.storage.uri import join_uri, local_path


def test_parse_uris() -> None:
    assert parse_uri("s3://bucket/a/b/") == parse_uri("s3://bucket/a/b/")
    p = parse_uri("s3://bucket/a/b/")
    assert (p.scheme, p.netloc, p.path, p.is_dir) == ("s3", "bucket", "a/b/", True)
    h = parse_uri("hf://org/name")
    assert (h.scheme, h.netloc) == ("hf", "org/name")
    assert parse_uri("file:///x/y").path == "/x/y"
    assert parse_uri("rel/dir").scheme == "file"
    with pytest.raises(ValueError, match="expected a URI"):
        parse_uri("gs://bucket/x")
    assert join_uri("s3://b/p/", "checkpoints/", "step-1/") == "s3://b/p/checkpoints/step-1/"


def test_pvc_uri_maps_under_the_mount_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAFT_PVC_ROOT", str(tmp_path))
    assert local_path("pvc://claim/models/tiny") == tmp_path / "claim" / "models" / "tiny"


def _make_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00" * 1000)
    return root


def test_write_artifact_writes_manifest_last_with_digests(tmp_path: Path) -> None:
    src = _make_dir(tmp_path / "src")
    uri = f"file://{tmp_path}/out/adapter/"
    order: list[str] = []

    class Recording(LocalStore):
        def upload_file(self, path: Path, uri: str) -> None:
            order.append(uri.rsplit("/", 1)[-1])
            super().upload_file(path, uri)

        def write_bytes(self, uri: str, data: bytes) -> None:
            order.append(uri.rsplit("/", 1)[-1])
            super().write_bytes(uri, data)

    manifest = write_artifact(src, uri, {"kind": "adapter"}, store=Recording())
    assert order[-1] == "manifest.json" and sorted(order[:-1]) == ["a.txt", "b.bin"]
    on_disk = json.loads((tmp_path / "out/adapter/manifest.json").read_text())
    assert on_disk == manifest == read_manifest(uri)
    assert on_disk["files"]["sub/b.bin"] == {"sha256": file_digest(src / "sub/b.bin"), "size": 1000}


def test_incomplete_artifact_has_no_manifest(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "weights").write_text("x")
    assert read_manifest(f"file://{tmp_path}/half/") is None


def test_latest_complete_checkpoint_ignores_ones_without_manifest(tmp_path: Path) -> None:
    prefix = f"file://{tmp_path}/job/checkpoints/"
    assert latest_complete_checkpoint(prefix) is None
    for step in (10, 20):
        d = _make_dir(tmp_path / f"c{step}")
        write_artifact(d, join_uri(prefix, f"step-{step:08d}/"), {"step": step})
    # step 30 was being uploaded when the pod died: files, no manifest
    partial = tmp_path / "job/checkpoints/step-00000030"
    partial.mkdir()
    (partial / "trainable.pt").write_text("partial")
    found = latest_complete_checkpoint(prefix)
    assert found is not None
    uri, manifest = found
    assert uri.endswith("step-00000020/") and manifest["step"] == 20


def test_directory_transfer_is_resumable(tmp_path: Path) -> None:
    src = _make_dir(tmp_path / "src")
    dest_uri = f"file://{tmp_path}/store/"
    assert sorted(upload_dir(src, dest_uri)) == ["a.txt", "sub/b.bin"]
    local = tmp_path / "local"
    download_dir(dest_uri, local)
    assert (local / "sub/b.bin").read_bytes() == b"\x00" * 1000
    # an interrupted download left a partial file: only that one is fetched again
    (local / "sub/b.bin").write_bytes(b"\x00" * 10)
    fetched: list[str] = []

    class Counting(LocalStore):
        def download_file(self, uri: str, path: Path) -> None:
            fetched.append(uri)
            super().download_file(uri, path)

    download_dir(dest_uri, local, store=Counting())
    assert [u.rsplit("/", 1)[-1] for u in fetched] == ["b.bin"]
    assert (local / "sub/b.bin").stat().st_size == 1000


def test_missing_source_and_unwritable_target_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="nothing there"):
        download_dir(f"file://{tmp_path}/nope/", tmp_path / "x")
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError, match="cannot write"):
        LocalStore().check(f"file://{blocker}/sub/", write=True)
