"""Stores behind URIs: local files (file://, pvc://, plain paths) and S3 (s3://).

The S3 client is built from the environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY) with path-style addressing, so MinIO, Ceph and moto work as well as AWS.
Buckets named in GRAFT_S3_BUCKET_CREDENTIALS (JSON: bucket -> environment prefix, set by the
operator from each location's credentials Secret) get their own client from the variables
under that prefix, so model, data and output may live in stores with different credentials.
Directory transfers are parallel and resumable: a file already present with the same size is
skipped, and each download lands in a `.part` file renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from graft.storage.uri import join_uri, local_path, parse_uri

DEFAULT_WORKERS = 8
# How long one store operation keeps retrying while the store is down (seconds).
DEFAULT_STORE_RETRY_SECONDS = 180.0
# S3 error codes that mean "try again shortly" whatever their HTTP status.
TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ServiceUnavailable"}
)

logger = logging.getLogger("graft.storage")


def store_retry_seconds() -> float:
    """GRAFT_STORE_RETRY_SECONDS: the time budget of one store operation's retries."""
    raw = os.environ.get("GRAFT_STORE_RETRY_SECONDS", "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_STORE_RETRY_SECONDS
    except ValueError:
        return DEFAULT_STORE_RETRY_SECONDS


class StoreError(RuntimeError):
    """A store could not be reached or an object could not be read or written (one line)."""


class StoreAccessError(StoreError):
    """The store answered and refused: no such bucket, unknown or wrong credentials, or not
    allowed to read or write there. Never transient: a retry gets the same answer."""


# S3 error codes that mean StoreAccessError (the request reached the store and was refused).
REFUSED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "InvalidBucketName",
        "AccountProblem",
        "403",
        "404",
    }
)


class IntegrityError(StoreError):
    """What is stored cannot be trusted: a file differs from its manifest's digest, or an object
    key would land outside the folder it is downloaded into. Never transient: a retry reads the
    same bytes."""


def contained_path(root: Path, key: str) -> Path:
    """`root / key`, refused (IntegrityError) when the key is absolute or climbs out of `root`
    (`..`): object keys come from a store other tenants may write to."""
    parts = key.replace("\\", "/").split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise IntegrityError(
            f"object key {key!r} is not a plain relative path (an absolute path, '..', '.' or "
            "an empty part): refused, nothing is written outside the download folder"
        )
    target = root / key
    if not target.resolve().is_relative_to(root.resolve()):
        raise IntegrityError(f"object key {key!r} resolves outside {root}: refused")
    return target


class Store(ABC):
    """Object-store operations on full URIs. Keys returned by `list` are relative to the prefix."""

    @abstractmethod
    def list(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix` (a directory URI): relative key -> size in bytes."""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes | None:
        """The object's content, or None when it does not exist."""

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(self, path: Path, uri: str) -> None: ...

    @abstractmethod
    def download_file(self, uri: str, path: Path) -> None: ...

    @abstractmethod
    def delete(self, uris: Iterable[str]) -> None: ...

    @abstractmethod
    def check(self, uri: str, write: bool = False) -> None:
        """Raise StoreError with a one-line reason when `uri`'s store is unreachable."""

    def exists(self, uri: str) -> bool:
        return self.read_bytes(uri) is not None

    def versions(self, uri: str) -> dict[str, str]:
        """What identifies the current content of each object under the directory `uri`, or of
        the one object `uri` (keyed by its name): a cache entry made from other versions is not
        reused. Here the size alone; stores that know more say more."""
        if uri.endswith("/"):
            return {key: str(size) for key, size in self.list(uri).items()}
        data = self.read_bytes(uri)
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        return {} if data is None else {name: hashlib.sha256(data).hexdigest()}


class LocalStore(Store):
    """file://, pvc:// (mounted under GRAFT_PVC_ROOT) and plain paths."""

    @staticmethod
    def _path(uri: str) -> Path:
        path = local_path(uri)
        if path is None:
            raise ValueError(f"not a local URI: {uri}")
        return path

    def list(self, prefix: str) -> dict[str, int]:
        root = self._path(prefix)
        if not root.is_dir():
            return {}
        return {
            p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".part")
        }

    def read_bytes(self, uri: str) -> bytes | None:
        path = self._path(uri)
        return path.read_bytes() if path.is_file() else None

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = self._path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def upload_file(self, path: Path, uri: str) -> None:
        target = self._path(uri)
        if target.resolve() == Path(path).resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def download_file(self, uri: str, path: Path) -> None:
        source = self._path(uri)
        if not source.is_file():
            raise StoreError(f"{uri}: no such file")
        self.upload_file(source, "file://" + str(Path(path).resolve()))

    def delete(self, uris: Iterable[str]) -> None:
        for uri in uris:
            self._path(uri).unlink(missing_ok=True)

    def check(self, uri: str, write: bool = False) -> None:
        path = self._path(uri)
        if not write:
            if not path.exists():
                raise StoreError(f"{uri}: no such file or directory")
            return
        probe = path if path.is_dir() or uri.endswith("/") else path.parent
        try:
            probe.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write to {uri}: {exc.strerror or exc}") from None
        if not os.access(probe, os.W_OK):
            raise StoreError(f"cannot write to {uri}: permission denied")


BUCKET_CREDENTIALS_ENV = "GRAFT_S3_BUCKET_CREDENTIALS"
CREDENTIAL_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_S3_ADDRESSING_STYLE",
)
ADDRESSING_STYLES = ("path", "virtual", "auto")
HF_TOKENS_ENV = "GRAFT_HF_TOKENS"


def _mapped(env: dict[str, str], map_variable: str, key: str) -> str | None:
    """`key`'s entry in the JSON object held by `map_variable` (set by the operator); None when
    absent or unreadable."""
    import json

    try:
        mapping = json.loads(env.get(map_variable) or "{}")
    except ValueError:
        return None
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return str(value) if value else None


def hf_token(repo: str, env: dict[str, str] | None = None) -> str | None:
    """The token for hf://`repo` (org/name): its location's own Secret's HF_TOKEN, named by
    GRAFT_HF_TOKENS (repo -> variable), over the plain HF_TOKEN."""
    env = dict(os.environ) if env is None else env
    name = _mapped(env, HF_TOKENS_ENV, repo)
    return (env.get(name) if name else None) or env.get("HF_TOKEN") or None


def bucket_credentials(bucket: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The AWS_* settings for `bucket`: its own (GRAFT_S3_BUCKET_CREDENTIALS) over the plain
    environment's. Only names and prefixes are configuration; values come from Secrets."""
    env = dict(os.environ) if env is None else env
    settings = {k: env[k] for k in CREDENTIAL_KEYS if env.get(k)}
    prefix = _mapped(env, BUCKET_CREDENTIALS_ENV, bucket)
    if prefix:
        own = {k: env[prefix + k] for k in CREDENTIAL_KEYS if env.get(prefix + k)}
        if "AWS_ACCESS_KEY_ID" in own:  # a Secret's keys replace the ambient ones as a set
            settings.pop("AWS_SESSION_TOKEN", None)
        settings.update(own)
    return settings


def s3_client(endpoint_url: str | None = None, bucket: str | None = None) -> Any:
    """A boto3 S3 client from the environment (the bucket's own credentials, when it has any),
    path-style unless AWS_S3_ADDRESSING_STYLE says otherwise, with short connect timeouts."""
    import boto3
    from botocore.config import Config

    settings = bucket_credentials(bucket or "")
    # Path-style works with MinIO, Ceph RGW and moto, and with AWS; a store that serves only
    # bucket-named hosts (virtual) says so in its Secret or in trainer.extraEnv.
    style = settings.get("AWS_S3_ADDRESSING_STYLE", "path").strip().lower()
    if style not in ADDRESSING_STYLES:
        raise StoreAccessError(
            f"AWS_S3_ADDRESSING_STYLE is {style!r} (from the credentials Secret of bucket "
            f"{bucket!r} or the trainer's environment): expected one of "
            + ", ".join(ADDRESSING_STYLES)
        )
    config = Config(
        s3={"addressing_style": style},
        connect_timeout=float(os.environ.get("GRAFT_S3_CONNECT_TIMEOUT", "5")),
        read_timeout=120,
        retries={
            "max_attempts": int(os.environ.get("GRAFT_S3_MAX_ATTEMPTS", "4")),
            "mode": "standard",
        },
        max_pool_connections=DEFAULT_WORKERS * 2,
    )
    region = settings.get("AWS_REGION") or settings.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or settings.get("AWS_ENDPOINT_URL") or None,
        region_name=region,
        aws_access_key_id=settings.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=settings.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=settings.get("AWS_SESSION_TOKEN"),
        config=config,
    )


def _s3_reason(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '') or type(exc).__name__}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class S3Store(Store):
    """s3://bucket/key URIs through one boto3 client per bucket (or the one given)."""

    def __init__(self, client: Any | None = None) -> None:
        self._client = client
        self._clients: dict[str, Any] = {}

    def client_for(self, bucket: str) -> Any:
        if self._client is not None:
            return self._client
        if bucket not in self._clients:
            self._clients[bucket] = s3_client(bucket=bucket)
        return self._clients[bucket]

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = parse_uri(uri)
        if parsed.scheme != "s3":
            raise ValueError(f"not an s3:// URI: {uri}")
        return parsed.netloc, parsed.path

    def _call(self, what: str, uri: str, fn: Callable[[], Any]) -> Any:
        """`fn()`, retried while the store is down or overloaded (connection refused, timeouts,
        5xx, SlowDown) for up to GRAFT_STORE_RETRY_SECONDS in all: an S3 outage of a few
        minutes costs a wait, not a pod (botocore's own attempts are spent in seconds on a
        refused connection). A refusal or any other answer fails at once."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + store_retry_seconds()
        delay = 0.5
        while True:
            try:
                return fn()
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                failure: StoreError = (StoreAccessError if code in REFUSED_CODES else StoreError)(
                    f"{what} {uri} failed: {_s3_reason(exc)}"
                )
                transient = status >= 500 or code in TRANSIENT_CODES
            except BotoCoreError as exc:
                endpoint = self.client_for(self._split(uri)[0]).meta.endpoint_url
                failure = StoreError(
                    f"{what} {uri} failed: cannot reach the S3 store at {endpoint} "
                    f"({_s3_reason(exc)})"
                )
                transient = True
            left = deadline - time.monotonic()
            if not transient or left <= 0:
                raise failure from None
            logger.warning("%s; retrying for up to %.0f s more", failure, left)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 15.0)

    def list(self, prefix: str) -> dict[str, int]:
        bucket, key = self._split(prefix)
        if key and not key.endswith("/"):
            key += "/"
        out: dict[str, int] = {}

        def run() -> None:
            paginator = self.client_for(bucket).get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(key) :]] = int(obj["Size"])

        self._call("listing", prefix, run)
        return out

    def versions(self, uri: str) -> dict[str, str]:
        """Size and ETag of each object (the ETag changes with the content, also when an object
        is replaced by one of the same size)."""
        bucket, key = self._split(uri)
        out: dict[str, str] = {}
        if not uri.endswith("/"):

            def head() -> None:
                from botocore.exceptions import ClientError

                try:
                    meta = self.client_for(bucket).head_object(Bucket=bucket, Key=key)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                        return
                    raise
                out[key.rsplit("/", 1)[-1]] = f"{meta['ContentLength']}:{meta.get('ETag', '')}"

            self._call("looking up", uri, head)
            return out

        def run() -> None:
            paginator = self.client_for(bucket).get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(key) :]] = f"{obj['Size']}:{obj.get('ETag', '')}"

        self._call("listing", uri, run)
        return out

    def read_bytes(self, uri: str) -> bytes | None:
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)

        def get() -> bytes | None:
            try:
                body = self.client_for(bucket).get_object(Bucket=bucket, Key=key)["Body"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            data: bytes = body.read()
            return data

        result: bytes | None = self._call("reading", uri, get)
        return result

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._split(uri)
        self._call(
            "writing",
            uri,
            lambda: self.client_for(bucket).put_object(Bucket=bucket, Key=key, Body=data),
        )

    def upload_file(self, path: Path, uri: str) -> None:
        bucket, key = self._split(uri)
        self._call(
            "uploading to", uri, lambda: self.client_for(bucket).upload_file(str(path), bucket, key)
        )

    def download_file(self, uri: str, path: Path) -> None:
        bucket, key = self._split(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        self._call(
            "downloading", uri, lambda: self.client_for(bucket).download_file(bucket, key, str(tmp))
        )
        os.replace(tmp, path)

    def delete(self, uris: Iterable[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            bucket, key = self._split(uri)
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for i in range(0, len(keys), 1000):
                chunk = [{"Key": k} for k in keys[i : i + 1000]]
                self._call(
                    "deleting in",
                    f"s3://{bucket}/",
                    lambda c=chunk, b=bucket: self.client_for(b).delete_objects(  # type: ignore[misc]
                        Bucket=b, Delete={"Objects": c, "Quiet": True}
                    ),
                )

    def exists(self, uri: str) -> bool:
        """Whether the object is there, from its metadata alone (a HEAD: a dataset of many
        gigabytes is not read to learn that)."""
        from botocore.exceptions import ClientError

        bucket, key = self._split(uri)

        def head() -> bool:
            try:
                self.client_for(bucket).head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return False
                raise
            return True

        found: bool = self._call("looking up", uri, head)
        return found

    def check(self, uri: str, write: bool = False) -> None:
        """The bucket exists and answers; with `write`, an object can be written under `uri`
        (and is removed again): read-only credentials fail here, not at the first checkpoint."""
        bucket, key = self._split(uri)
        client = self.client_for(bucket)
        self._call("reaching", f"s3://{bucket}/", lambda: client.head_bucket(Bucket=bucket))
        if write:
            probe = key.rstrip("/") + "/.graft-write-check" if key else ".graft-write-check"
            self._call(
                "writing to",
                uri,
                lambda: client.put_object(Bucket=bucket, Key=probe, Body=b"graft"),
            )
            self._call("deleting in", uri, lambda: client.delete_object(Bucket=bucket, Key=probe))


def open_store(uri: str, client: Any | None = None) -> Store:
    """The store for a URI's scheme (hf:// is read through huggingface_hub, not a Store)."""
    scheme = parse_uri(uri).scheme
    if scheme == "s3":
        return S3Store(client)
    if scheme in ("file", "pvc"):
        return LocalStore()
    raise ValueError(f"{uri}: {scheme}:// is not an object store")


def upload_dir(
    local_dir: str | Path,
    uri: str,
    store: Store | None = None,
    exclude: Iterable[str] = (),
    workers: int = DEFAULT_WORKERS,
) -> list[str]:
    """Upload every file under `local_dir` to the prefix `uri` in parallel; returns the keys.

    Every file is written, even one the store already has with the same size: equal sizes say
    nothing about equal bytes, and a retried upload must not leave old bytes under a new manifest.
    """
    root = Path(local_dir)
    store = store or open_store(uri)
    skip = set(exclude)
    files = [
        p.relative_to(root).as_posix()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in skip
    ]
    _parallel(lambda f: store.upload_file(root / f, join_uri(uri, f)), files, workers)
    return files


def download_dir(
    uri: str,
    local_dir: str | Path,
    store: Store | None = None,
    workers: int = DEFAULT_WORKERS,
    only: Callable[[str], bool] | None = None,
) -> Path:
    """Download every object under the prefix `uri` into `local_dir` in parallel.

    Resumable: files already there with the right size are kept; partial downloads are `.part`
    files that are only renamed into place when complete. Every key must stay inside
    `local_dir` (IntegrityError before anything is written otherwise). A reader that needs the
    bytes to be the ones a manifest describes uses `download_artifact`, which checks digests.
    """
    root = Path(local_dir)
    store = store or open_store(uri)
    objects = store.list(uri)
    if not objects:
        raise StoreError(f"{uri}: nothing there (expected a directory of files)")
    wanted = {k: size for k, size in objects.items() if only is None or only(k)}
    targets = {key: contained_path(root, key) for key in wanted}
    todo = [
        key
        for key, size in wanted.items()
        if not (targets[key].is_file() and targets[key].stat().st_size == size)
    ]
    root.mkdir(parents=True, exist_ok=True)
    _parallel(lambda k: store.download_file(join_uri(uri, k), root / k), todo, workers)
    return root


def _parallel(fn: Callable[[str], None], items: list[str], workers: int) -> None:
    if not items:
        return
    if len(items) == 1 or workers <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
