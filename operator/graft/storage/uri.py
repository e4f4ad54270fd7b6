"""Parsing of the URIs Graft reads and writes: s3://, hf://, pvc://, file:// and plain paths."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SCHEMES = ("s3", "hf", "pvc", "file")

# Where pvc://claim/path is mounted inside a trainer pod: <root>/<claim>/<path>.
PVC_ROOT_ENV = "GRAFT_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/graft/pvc"


@dataclass(frozen=True)
class ParsedUri:
    """scheme, then `netloc` (bucket, claim, hf org/name or empty for files) and `path`."""

    scheme: str
    netloc: str
    path: str

    @property
    def is_dir(self) -> bool:
        return self.path == "" or self.path.endswith("/")


def parse_uri(uri: str) -> ParsedUri:
    """Split a URI; a string without `://` is a local path (scheme `file`)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return ParsedUri("file", "", str(Path(uri).resolve()) + ("/" if uri.endswith("/") else ""))
    if scheme not in SCHEMES:
        raise ValueError(f"expected a URI with one of s3://, hf://, pvc://, file://; got {uri!r}")
    if scheme == "file":
        return ParsedUri("file", "", rest)
    if scheme == "hf":
        parts = rest.strip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]):
            raise ValueError(f"expected hf://org/name; got {uri!r}")
        return ParsedUri("hf", "/".join(parts[:2]), "/".join(parts[2:]))
    netloc, _, path = rest.partition("/")
    if not netloc:
        raise ValueError(f"URI {uri!r} names no bucket or claim")
    return ParsedUri(scheme, netloc, path)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI prefix with single slashes; keeps a trailing slash of the last."""
    out = base
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def local_path(uri: str) -> Path | None:
    """The local filesystem path of a file://, pvc:// or plain-path URI, else None."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "pvc":
        root = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
        return root / parsed.netloc / parsed.path
    return None
