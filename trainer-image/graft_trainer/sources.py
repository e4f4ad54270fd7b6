"""Fetch models and datasets from hf://, s3://, pvc://, file:// or plain paths to local files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graft.api.base import Location
from graft.api.finetune import DatasetSpec
from graft.storage import (
    IntegrityError,
    local_path,
    open_store,
    parse_uri,
    read_manifest,
    verify_artifact,
)
from graft_trainer import hub
from graft_trainer.cache import cached_artifact, cached_objects
from graft_trainer.data import Record, detect_format, digest_files, read_records, stratified_source
from graft_trainer.errors import GraftInputError
from graft_trainer.hub import RevisionPins


def fetch_model(location: Location, pins: RevisionPins | None = None, field: str = "model") -> Path:
    """A local directory holding the model (config, weights, tokenizer).

    An hf:// model is the snapshot of its pinned commit when `pins` has one (else of its
    revision), and the commit it resolved to is recorded there. A folder with a manifest (what Graft wrote: adapters, merged models, exports) is read only
    when every file matches the manifest's digest; a mismatch is IntegrityError (exit code 3,
    not retried). A folder without one (a base model a person uploaded) is taken as it is."""
    try:
        return _fetch_model(location, pins, field)
    except IntegrityError as exc:
        raise IntegrityError(f"model {location.uri} refused: {exc}") from None


def _fetch_model(location: Location, pins: RevisionPins | None, field: str) -> Path:
    uri = location.uri
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        snapshot = hub.fetch(
            uri, repo_type="model", revision=location.revision, field=field, pins=pins
        )
        return snapshot.path
    if parsed.scheme == "s3":
        prefix = uri if uri.endswith("/") else uri + "/"
        store = open_store(prefix)
        if read_manifest(prefix, store) is not None:
            return cached_artifact(prefix, store)
        folder = cached_objects(prefix, store)
        if folder is None:
            raise GraftInputError(f"{field} {uri}: nothing there (expected a model directory)")
        return folder
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
        folder = cached_objects(uri, open_store(uri))
        if folder is None:
            raise GraftInputError(f"dataset {uri}: no such object or folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
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


def load_splits(
    spec: DatasetSpec, pins: RevisionPins | None = None
) -> tuple[dict[str, list[Record]], str]:
    """All records by split name, and a digest of the source (file content or hf commit)."""
    if parse_uri(spec.uri).scheme == "hf":
        return load_hf_splits(spec, pins)
    files = fetch_dataset_files(spec)
    splits: dict[str, list[Record]] = {}
    for path in files:
        for name, rows in read_records(path, detect_format(path, spec.format)).items():
            splits.setdefault(name, []).extend(rows)
    return splits, "sha256:" + digest_files(files)


def load_hf_splits(
    spec: DatasetSpec, pins: RevisionPins | None = None
) -> tuple[dict[str, list[Record]], str]:
    """An hf:// dataset: the repository's snapshot at its (pinned) commit, each split expression
    (`train[:90%]`) resolved by `datasets` on those local files. Only the Hub's download
    protocol is spoken, so a mirror that serves models serves datasets too."""
    snapshot = hub.fetch(
        spec.uri, repo_type="dataset", revision=spec.revision, field="dataset", pins=pins
    )
    out: dict[str, list[Record]] = {}
    expressions = [e for e in (spec.train_split, spec.eval_split) if e]
    if spec.stratify_by and spec.eval_split:
        # Stratified slices are cut per label group here (data.stratified_splits), so the
        # split they slice is loaded whole: `train` for 'train[:90%]' and 'train[90%:]'.
        expressions = [stratified_source(spec.train_split, spec.eval_split)]
    try:
        import datasets

        for expr in expressions:
            ds: Any = datasets.load_dataset(str(snapshot.path), split=expr)
            out[expr] = list(ds)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        # An unknown split name, a bad slice, no data files: the same on every retry.
        raise GraftInputError(
            f"dataset {spec.uri}@{snapshot.commit[:12]}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"[:400]
        ) from None
    repo = parse_uri(spec.uri).netloc
    return out, f"hf:{repo}@{snapshot.commit}"
