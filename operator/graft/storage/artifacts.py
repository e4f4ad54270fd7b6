"""Artifacts: a directory of files plus `manifest.json`, written last.

A reader trusts an artifact only when its manifest exists; the manifest lists every file with
its sha256 and size, so a half-written directory is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from graft.storage.store import (
    IntegrityError,
    Store,
    StoreError,
    contained_path,
    download_dir,
    open_store,
    upload_dir,
)
from graft.storage.uri import join_uri

MANIFEST = "manifest.json"
CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content, hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(local_dir: str | Path) -> dict[str, dict[str, Any]]:
    """relative path -> {sha256, size} for every file under `local_dir` except the manifest."""
    root = Path(local_dir)
    return {
        p.relative_to(root).as_posix(): {"sha256": file_digest(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def write_artifact(
    local_dir: str | Path,
    uri: str,
    manifest: dict[str, Any] | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Upload `local_dir` to the prefix `uri`: every file first, then `manifest.json`.

    The manifest gets `files` (sha256 and size of each file) added to what the caller passed;
    it is also written into `local_dir`. Returns the manifest.
    """
    root = Path(local_dir)
    store = store or open_store(uri)
    body = dict(manifest or {})
    body["files"] = describe_files(root)
    upload_dir(root, uri, store=store, exclude=[MANIFEST])
    text = json.dumps(body, indent=2, sort_keys=True, default=str) + "\n"
    (root / MANIFEST).write_text(text)
    store.write_bytes(join_uri(uri, MANIFEST), text.encode())
    return body


def read_manifest(uri: str, store: Store | None = None) -> dict[str, Any] | None:
    """The manifest of the artifact at prefix `uri`, or None when it is not complete."""
    store = store or open_store(uri)
    data = store.read_bytes(join_uri(uri, MANIFEST))
    if data is None:
        return None
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def verify_artifact(local_dir: str | Path, manifest: dict[str, Any], uri: str = "") -> None:
    """Check every file the manifest lists against its sha256; IntegrityError naming the first
    file that is missing or differs."""
    root = Path(local_dir)
    files = manifest.get("files")
    where = uri or str(root)
    if not isinstance(files, dict):
        raise IntegrityError(f"{where}: the manifest lists no files")
    for key, meta in sorted(files.items()):
        path = contained_path(root, key)
        expected = meta.get("sha256") if isinstance(meta, dict) else None
        if not path.is_file():
            raise IntegrityError(f"{where}: {key} is listed in the manifest but missing")
        actual = file_digest(path)
        if actual != expected:
            raise IntegrityError(
                f"{where}: {key} does not match its manifest (sha256 {actual[:16]}..., "
                f"manifest says {str(expected)[:16]}...): refused, it was changed after "
                "it was written"
            )


def download_artifact(
    uri: str, local_dir: str | Path, store: Store | None = None
) -> tuple[Path, dict[str, Any]]:
    """Download the complete artifact at prefix `uri`: only the files its manifest lists, each
    checked against its digest (IntegrityError on any difference), then the manifest itself
    (readers of the folder find it there, as in the store). Returns (folder, manifest)."""
    store = store or open_store(uri)
    manifest = read_manifest(uri, store)
    if manifest is None:
        raise StoreError(f"{uri}: no manifest.json, so the artifact is not complete")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IntegrityError(f"{uri}: the manifest lists no files")
    root = download_dir(uri, local_dir, store=store, only=lambda key: key in files)
    verify_artifact(root, manifest, uri)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return root, manifest


def list_checkpoints(prefix: str, store: Store | None = None) -> list[tuple[int, str, bool]]:
    """(step, uri, complete) of each `step-N/` directory under `prefix`, by step."""
    store = store or open_store(prefix)
    found: dict[int, bool] = {}
    for key in store.list(prefix):
        top, _, rest = key.partition("/")
        match = CHECKPOINT_DIR.match(top)
        if match:
            step = int(match.group(1))
            found[step] = found.get(step, False) or rest == MANIFEST
    return [
        (step, join_uri(prefix, f"step-{step:08d}/"), complete)
        for step, complete in sorted(found.items())
    ]


def checkpoint_uri(prefix: str, step: int) -> str:
    return join_uri(prefix, f"step-{step:08d}/")


def latest_complete_checkpoint(
    prefix: str, store: Store | None = None
) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint under `prefix` whose manifest exists: (uri, manifest), or None."""
    store = store or open_store(prefix)
    for _step, uri, complete in reversed(list_checkpoints(prefix, store)):
        if not complete:
            continue
        manifest = read_manifest(uri, store)
        if manifest is not None:
            return uri, manifest
    return None
