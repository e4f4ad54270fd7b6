"""hf:// sources: snapshots from the Hugging Face Hub, or the mirror HF_ENDPOINT names.

Each fetch resolves a revision (a branch, tag or commit) to a commit and downloads that
commit's files through `huggingface_hub` (its cache, locks and resumable downloads). What
fails is sorted as the operator needs it:

- the user's to fix, never retried (GraftInputError, exit 2): an unknown or private
  repository, a gated one the token may not read, a revision or file that does not exist, a
  refused token, or offline mode with nothing in the cache;
- transient (StoreError, exit 1): connection errors, timeouts, 429 and 5xx answers. They are
  retried in the pod for up to GRAFT_STORE_RETRY_SECONDS first, as S3 outages are.

`RevisionPins` keeps the commit each source resolved to on a resource's first attempt beside
its artifacts, so a retried or resumed pod trains on the same bytes after `main` has moved.
Messages name the URI and the spec field, never a token.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.storage.store import StoreError, hf_token, store_retry_seconds
from graft.storage.uri import parse_uri
from graft_trainer.errors import GraftInputError

log = logging.getLogger("graft.trainer.hub")

COMMIT = re.compile(r"^[0-9a-f]{40}$")
PINS_FILE = "sources.json"


@dataclass(frozen=True)
class HubSnapshot:
    path: Path
    commit: str


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_snapshot(uri: str, *, repo_type: str, revision: str | None, field: str) -> HubSnapshot:
    """The files of hf://org/name at `revision` (default main) in the local Hub cache."""
    repo = parse_uri(uri).netloc
    deadline = time.monotonic() + store_retry_seconds()
    delay = 1.0
    while True:
        try:
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    repo, repo_type=repo_type, revision=revision, token=hf_token(repo)
                )
            )
            return HubSnapshot(path=path, commit=path.name)
        except Exception as exc:  # sorted below; nothing else is worth a retry
            failure = classify(exc, uri, revision=revision, field=field)
        left = deadline - time.monotonic()
        if isinstance(failure, GraftInputError) or left <= 0:
            raise failure from None
        log.warning("%s; retrying for up to %.0f s more", failure, left)
        time.sleep(min(delay, left))
        delay = min(delay * 2, 15.0)


def classify(
    exc: BaseException, uri: str, *, revision: str | None, field: str
) -> GraftInputError | StoreError:
    """The error a failed Hub fetch becomes: the user's (GraftInputError) or transient."""
    from huggingface_hub import errors

    at = f"{field} {uri}"
    where = f"on {endpoint()}"
    secret_hint = (
        f"name a Secret holding HF_TOKEN in {field}.credentialsSecret"
        if hf_token(parse_uri(uri).netloc) is None
        else f"check the HF_TOKEN in {field}.credentialsSecret"
    )
    if isinstance(exc, errors.GatedRepoError):
        return GraftInputError(
            f"{at} is gated and the token used has not been granted access: request access "
            f"on the repository's page {where}, then {secret_hint}"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return GraftInputError(
            f"{at}: no such repository {where}, or it is private and the token used cannot "
            f"read it ({secret_hint})"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return GraftInputError(
            f"{at}: revision {revision or 'main'!r} does not exist ({field}.revision names a "
            "branch, tag or commit)"
        )
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return GraftInputError(f"{at}: a file of the repository is missing {where}")
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            return GraftInputError(
                f"{at}: the Hub refused the token (HTTP {status}); {secret_hint}"
            )
        return StoreError(f"cannot fetch {at} from {endpoint()}: HTTP {status}")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        if offline():
            return GraftInputError(
                f"{at}@{revision or 'main'} is not in the local Hub cache and offline mode is "
                "on (HF_HUB_OFFLINE; the chart's trainer.hub.offline)"
            )
        cause = exc.__cause__ or exc.__context__
        return StoreError(f"cannot fetch {at} from {endpoint()}: {_short(cause or exc)}")
    return StoreError(f"cannot fetch {at} from {endpoint()}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class RevisionPins:
    """The commit each hf:// source resolved to, by URI and requested revision.

    Loaded from and saved to `<artifact prefix>/sources.json` when a store is given. What is
    read there only chooses among commits of the repository the spec names (a 40-hex commit
    id, used as a revision), so a tampered file cannot point a fetch anywhere else."""

    def __init__(self, uri: str | None = None, store: Any = None) -> None:
        self.uri = uri
        self.store = store
        self.commits: dict[str, str] = {}
        self._dirty = False

    @staticmethod
    def key(source_uri: str, revision: str | None) -> str:
        return f"{source_uri}@{revision or 'main'}"

    @classmethod
    def load(cls, uri: str, store: Any) -> RevisionPins:
        pins = cls(uri, store)
        raw = store.read_bytes(uri)
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                data = {}
            commits = data.get("commits") if isinstance(data, dict) else None
            if isinstance(commits, dict):
                pins.commits = {
                    str(k): v for k, v in commits.items() if isinstance(v, str) and COMMIT.match(v)
                }
        return pins

    def commit_for(self, source_uri: str, revision: str | None) -> str | None:
        return self.commits.get(self.key(source_uri, revision))

    def record(self, source_uri: str, revision: str | None, commit: str) -> None:
        key = self.key(source_uri, revision)
        if self.commits.get(key) != commit:
            self.commits[key] = commit
            self._dirty = True

    def save(self) -> None:
        if self._dirty and self.uri is not None and self.store is not None:
            body = {"commits": dict(sorted(self.commits.items()))}
            self.store.write_bytes(self.uri, json.dumps(body, indent=2).encode() + b"\n")
            self._dirty = False


def fetch(
    uri: str,
    *,
    repo_type: str,
    revision: str | None,
    field: str,
    pins: RevisionPins | None,
) -> HubSnapshot:
    """`download_snapshot` at the pinned commit when there is one; records the commit."""
    pinned = pins.commit_for(uri, revision) if pins is not None else None
    if pinned and pinned != revision:
        log.info("%s %s: using commit %s pinned by the first attempt", field, uri, pinned)
    snapshot = download_snapshot(uri, repo_type=repo_type, revision=pinned or revision, field=field)
    if pins is not None:
        pins.record(uri, revision, snapshot.commit)
    return snapshot
