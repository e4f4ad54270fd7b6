"""The shared storage layer: URIs, stores (local files and S3), artifacts with manifests.

No torch here: the operator image installs it too. Plain blocking functions; async callers wrap
them in `asyncio.to_thread`. An artifact directory is complete only once its `manifest.json`
exists: files are written first, the manifest last, and readers trust only a manifest.
"""

from graft.storage.artifacts import (
    MANIFEST,
    download_artifact,
    file_digest,
    latest_complete_checkpoint,
    list_checkpoints,
    read_manifest,
    verify_artifact,
    write_artifact,
)
from graft.storage.store import (
    IntegrityError,
    LocalStore,
    S3Store,
    Store,
    StoreAccessError,
    StoreError,
    download_dir,
    open_store,
    s3_client,
    upload_dir,
)
from graft.storage.uri import ParsedUri, join_uri, local_path, parse_uri

__all__ = [
    "MANIFEST",
    "IntegrityError",
    "LocalStore",
    "ParsedUri",
    "S3Store",
    "Store",
    "StoreAccessError",
    "StoreError",
    "download_artifact",
    "download_dir",
    "file_digest",
    "join_uri",
    "latest_complete_checkpoint",
    "list_checkpoints",
    "local_path",
    "open_store",
    "parse_uri",
    "read_manifest",
    "s3_client",
    "upload_dir",
    "verify_artifact",
    "write_artifact",
]
