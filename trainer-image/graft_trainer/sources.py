"""Fetch models and datasets from hf://, s3://, pvc://, file:// or plain paths to local files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from graft.api.base import Location
from graft.api.finetune import DatasetSpec
from graft.storage import (
    IntegrityError,
    StoreError,
    download_artifact,
    download_dir,
    local_path,
    open_store,
    parse_uri,
    read_manifest,
    verify_artifact,
)
from graft.storage.store import hf_token
from graft_trainer.data import Record, detect_format, digest_files, read_records
from graft_trainer.errors import GraftInputError


def cache_dir() -> Path:
    root = os.environ.get("GRAFT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "graft"
    )
    return Path(root)


def _cache_for(uri: str, kind: str) -> Path:
    return cache_dir() / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]


def fetch_model(location: Location) -> Path:
    """A local directory holding the model (config, weights, tokenizer).

    A folder with a manifest (what Graft wrote: adapters, merged models, exports) is read only
    when every file matches the manifest's digest; a mismatch is IntegrityError (exit code 3,
    not retried). A folder without one (a base model a person uploaded) is taken as it is."""
    try:
        return _fetch_model(location)
    except IntegrityError as exc:
        raise IntegrityError(f"model {location.uri} refused: {exc}") from None


def _fetch_model(location: Location) -> Path:
    uri = location.uri
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    parsed.netloc,
                    revision=location.revision,
                    token=hf_token(parsed.netloc),
                )
            )
        except Exception as exc:
            raise StoreError(f"cannot fetch {uri}: {type(exc).__name__}: {exc}") from None
    if parsed.scheme == "s3":
        prefix = uri if uri.endswith("/") else uri + "/"
        store = open_store(prefix)
        if read_manifest(prefix, store) is not None:
            return download_artifact(prefix, _cache_for(prefix, "models"), store=store)[0]
        return download_dir(prefix, _cache_for(prefix, "models"), store=store)
    path = local_path(uri)
    assert path is not None
    if not path.is_dir():
        raise GraftInputError(f"model {uri}: no such directory (expected a model directory)")
    manifest = read_manifest(path.as_uri() + "/")
    if manifest is not None:
        verify_artifact(path, manifest, uri)
    return path


def fetch_dataset_files(spec: DatasetSpec) -> list[Path]:
    """Local paths of the dataset's files (one file, or every data file of a directory)."""
    uri = spec.uri
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        target = _cache_for(uri, "datasets")
        store = open_store(uri)
        if uri.endswith("/"):
            root = download_dir(uri, target, store=store)
            files = sorted(p for p in root.rglob("*") if p.is_file())
        else:
            name = parsed.path.rsplit("/", 1)[-1]
            path = target / name
            if not store.exists(uri):
                raise GraftInputError(f"dataset {uri}: no such object")
            store.download_file(uri, path)
            files = [path]
    else:
        path = local_path(uri)
        assert path is not None
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files = [path]
        else:
            raise GraftInputError(f"dataset {uri}: no such file")
    if not files:
        raise GraftInputError(f"dataset {uri}: no data files there")
    return files


def load_splits(spec: DatasetSpec) -> tuple[dict[str, list[Record]], str]:
    """All records by split name, and a digest of the source (file content or hf revision)."""
    if parse_uri(spec.uri).scheme == "hf":
        return load_hf_splits(spec)
    files = fetch_dataset_files(spec)
    splits: dict[str, list[Record]] = {}
    for path in files:
        for name, rows in read_records(path, detect_format(path, spec.format)).items():
            splits.setdefault(name, []).extend(rows)
    return splits, "sha256:" + digest_files(files)


def load_hf_splits(spec: DatasetSpec) -> tuple[dict[str, list[Record]], str]:
    """An hf:// dataset: each split expression is resolved by `datasets` itself."""
    try:
        import datasets

        repo = parse_uri(spec.uri).netloc
        token = hf_token(repo)
        out: dict[str, list[Record]] = {}
        for expr in filter(None, [spec.train_split, spec.eval_split]):
            ds: Any = datasets.load_dataset(repo, split=expr, revision=spec.revision, token=token)
            out[expr] = list(ds)
    except Exception as exc:
        raise StoreError(f"cannot load dataset {spec.uri}: {type(exc).__name__}: {exc}") from None
    return out, f"hf:{repo}@{spec.revision or 'main'}"
