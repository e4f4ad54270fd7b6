"""Digests, library versions and the `manifest.json` an export directory ends with."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from graft.storage.artifacts import MANIFEST, describe_files, file_digest

# What identifies a model's weights: config and weight files, not READMEs or manifests.
_MODEL_FILES = ("config.json",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
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
    """sha256 over config.json and the weight files (name and content), hex.

    Two directories holding the same weights have the same digest wherever they live; the
    tokenizer does not count (a retrained tokenizer with the same weights is caught by shapes).
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and (p.name in _MODEL_FILES or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    for path in files:
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


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
