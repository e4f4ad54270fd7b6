"""The download cache of what trainers read from S3 (base models, adapters, datasets), shared by
every pod that mounts the same cache claim, so a base model is fetched once per cache.

Entries are named by what they hold: an artifact by the digest of its manifest, any other
object or folder by its URI and the store's versions of its objects (size and ETag). A model
replaced in the store is therefore fetched again, never served stale. An entry is filled in a
private staging folder and renamed into place whole: pods filling the same entry at once each
download, one rename wins, and no reader ever sees a torn file. An artifact's entry is checked
against its manifest on every read and fetched again when it differs: the store is the
authority, the cache only saves time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graft.storage import (
    IntegrityError,
    Store,
    download_artifact,
    download_dir,
    read_manifest,
    verify_artifact,
)

log = logging.getLogger("graft_trainer.cache")


def cache_root() -> Path:
    """GRAFT_CACHE_DIR (the cache claim's mount in a pod), else ~/.cache/graft."""
    root = os.environ.get("GRAFT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "graft"
    )
    return Path(root)


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _place(entry: Path, fill: Callable[[Path], None]) -> Path:
    """`entry`, filled by `fill(staging)` and renamed into place unless another pod was first."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:12]}.partial"
    try:
        fill(staging)
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.is_dir():  # not the "someone placed it first" case
                raise
            log.info("cache entry %s was filled by another pod first", entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def _discard(entry: Path) -> None:
    """Take a bad entry out of the cache at once (a rename), then delete it."""
    trash = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:12]}.discarded"
    try:
        os.rename(entry, trash)
    except OSError:
        return  # another pod discarded it already
    shutil.rmtree(trash, ignore_errors=True)


def cached_artifact(prefix: str, store: Store, root: Path | None = None) -> Path:
    """The artifact at `prefix` (a folder with a manifest) in the cache, checked against its
    manifest; IntegrityError only when the store's own copy fails the check."""
    manifest = read_manifest(prefix, store)
    if manifest is None:
        raise IntegrityError(f"{prefix}: no manifest.json")
    entry = (root or cache_root()) / "artifacts" / _digest(manifest)
    if entry.is_dir():
        try:
            verify_artifact(entry, manifest, prefix)
            log.info("%s: from the cache (%s)", prefix, entry)
            return entry
        except IntegrityError as exc:
            log.warning(
                "cache entry for %s differs from its manifest (%s): fetching again", prefix, exc
            )
            _discard(entry)
    return _place(entry, lambda staging: download_artifact(prefix, staging, store=store))


def cached_objects(uri: str, store: Store, root: Path | None = None) -> Path | None:
    """A folder holding the objects under the directory `uri` (or the one object `uri`, by its
    name); None when there is nothing there."""
    versions = store.versions(uri)
    if not versions:
        return None
    entry = (root or cache_root()) / "objects" / _digest([uri, sorted(versions.items())])
    if entry.is_dir():
        log.info("%s: from the cache (%s)", uri, entry)
        return entry

    def fill(staging: Path) -> None:
        if uri.endswith("/"):
            download_dir(uri, staging, store=store)
        else:
            staging.mkdir(parents=True)
            store.download_file(uri, staging / next(iter(versions)))

    return _place(entry, fill)
