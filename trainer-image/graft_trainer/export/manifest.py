"""Digests, library versions and the `manifest.json` an export directory ends with."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from graft.storage.artifacts import MANIFEST, describe_files

_LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "onnx",
    "onnx-ir",
    "onnxruntime",
    "onnxruntime-genai",
)


def model_digest(model_dir: Path) -> str:
    """The base-model digest as the FineTuneJob's manifest records it (`baseModel.digest`):
    ``sha256:`` over the names and contents of the files directly in the directory."""
    from graft_trainer.data import digest_files

    files = [p for p in Path(model_dir).iterdir() if p.is_file() and p.name != MANIFEST]
    return "sha256:" + digest_files(files)


def same_digest(a: str, b: str) -> bool:
    return a.removeprefix("sha256:") == b.removeprefix("sha256:")


def declared_base_digest(adapter_dir: Path) -> str | None:
    """The base-model digest an adapter artifact's manifest.json declares, if any."""
    path = Path(adapter_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    base = manifest.get("baseModel") if isinstance(manifest, dict) else None
    digest = base.get("digest") if isinstance(base, dict) else None
    return digest if isinstance(digest, str) and digest else None


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def directory_size(root: Path) -> int:
    return sum(
        p.stat().st_size for p in Path(root).rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(out_dir: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest.json` into `out_dir`, last, with every other file's sha256 and size."""
    manifest = dict(body)
    manifest["files"] = describe_files(out_dir)
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
    (Path(out_dir) / MANIFEST).write_text(text)
    return manifest
