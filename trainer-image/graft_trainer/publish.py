"""spec.publish: a finished adapter (or model) pushed to a Hugging Face Hub repository.

The artifact folder is pushed once its manifest is complete in the job's store (spec.output,
which stays the working store: checkpoints, resumable outputs): weights, adapter_config.json,
the model card README.md, tokenizer files and manifest.json, in one commit on the target
branch, through `huggingface_hub` (`create_repo(private=True, exist_ok=True)`, the branch created
from main when missing, `upload_folder` with the branch head as parent commit).

Before each attempt the branch's manifest.json is read: when it lists the same files with the
same digests, nothing is pushed and the branch head is recorded. So a retried attempt whose
first commit landed (its answer lost), or a rerun whose adapter is bit-identical, makes no
second commit.

What fails is sorted as hf:// downloads are (graft_trainer.hub): a refused or read-only token, an
organization the token may not create in, an unknown repository are the user's (GraftInputError,
exit 2, messages name spec.publish, never the token); connection errors, timeouts, 429, 5xx and a
branch that moved under the push are transient, retried for up to GRAFT_STORE_RETRY_SECONDS,
then StoreError (exit 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.storage import MANIFEST
from graft.storage.store import StoreError, hf_token, store_retry_seconds
from graft.storage.uri import parse_uri
from graft_trainer.errors import GraftInputError
from graft_trainer.hub import endpoint, offline

log = logging.getLogger("graft.trainer.publish")

FIELD = "spec.publish"


@dataclass(frozen=True)
class Published:
    repo: str
    branch: str
    commit: str
    files_digest: str
    pushed: bool  # False: the branch already held these files

    @property
    def uri(self) -> str:
        return f"hf://{self.repo}@{self.commit}"

    def record(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "repository": f"hf://{self.repo}",
            "branch": self.branch,
            "commit": self.commit,
            "filesDigest": self.files_digest,
            "pushed": self.pushed,
        }


def files_digest(manifest: dict[str, Any]) -> str:
    """A digest of what a manifest lists: every file's path and sha256 (not when or by whom
    it was written), so two manifests of the same bytes agree."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    listed = {
        str(path): meta.get("sha256")
        for path, meta in (files or {}).items()
        if isinstance(meta, dict)
    }
    canonical = json.dumps(listed, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def check_write_access(location: Any, field: str = FIELD) -> None:
    """Refuse, before any training, a publish the Hub will refuse anyway: offline mode, no
    token, a token the Hub rejects, or a read-only token (the Hub's whoami). A transient
    failure of the check is only logged: the push retries on its own."""
    from huggingface_hub import HfApi

    repo = parse_uri(location.uri).netloc
    if offline():
        raise GraftInputError(
            f"{field} {location.uri}: pushing needs the Hub, and offline mode is on "
            "(HF_HUB_OFFLINE; the chart's trainer.hub.offline)"
        )
    token = hf_token(repo)
    if token is None:
        raise GraftInputError(
            f"{field} {location.uri}: pushing needs a token with write access; name a Secret "
            f"holding HF_TOKEN in {field}.credentialsSecret"
        )
    try:
        who = HfApi(endpoint=endpoint(), token=token).whoami()
    except Exception as exc:
        failure = classify_push(exc, location.uri, branch=location.revision or "main", field=field)
        if isinstance(failure, GraftInputError):
            raise failure from None
        log.warning("could not check the publish token yet (%s); the push will tell", failure)
        return
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise GraftInputError(
            f"{field} {location.uri}: the token in {field}.credentialsSecret is read-only; "
            "pushing needs a token with write access"
        )


def push_folder(
    folder: Path, location: Any, *, message: str, description: str = "", field: str = FIELD
) -> Published:
    """Push `folder` (holding its manifest.json) to `location` (spec.publish), retrying
    transient failures; the commit the branch then holds."""
    repo = parse_uri(location.uri).netloc
    branch = location.revision or "main"
    if offline():
        raise GraftInputError(
            f"{field} {location.uri}: pushing needs the Hub, and offline mode is on "
            "(HF_HUB_OFFLINE; the chart's trainer.hub.offline)"
        )
    manifest = json.loads((folder / MANIFEST).read_text())
    want = files_digest(manifest)
    deadline = time.monotonic() + store_retry_seconds()
    delay = 1.0
    while True:
        try:
            return _push_once(folder, repo, branch, want, message, description)
        except Exception as exc:  # sorted below; nothing else is worth a retry
            failure = classify_push(exc, location.uri, branch=branch, field=field)
        left = deadline - time.monotonic()
        if isinstance(failure, GraftInputError) or left <= 0:
            raise failure from None
        log.warning("%s; retrying for up to %.0f s more", failure, left)
        time.sleep(min(delay, left))
        delay = min(delay * 2, 15.0)


def _push_once(
    folder: Path, repo: str, branch: str, want: str, message: str, description: str
) -> Published:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=hf_token(repo) or False)
    api.create_repo(repo, private=True, exist_ok=True)
    if branch != "main":
        api.create_branch(repo, branch=branch, exist_ok=True)
    head = api.repo_info(repo, revision=branch).sha
    assert head is not None
    there = _manifest_at(api, repo, head)
    if there is not None and files_digest(there) == want:
        log.info("hf://%s@%s already holds these files (%s): nothing pushed", repo, branch, want)
        return Published(repo, branch, head, want, pushed=False)
    info = api.upload_folder(
        repo_id=repo,
        folder_path=folder,
        revision=branch,
        commit_message=message,
        commit_description=description,
        parent_commit=head,
    )
    log.info("pushed %s to hf://%s@%s: commit %s", folder.name, repo, branch, info.oid)
    return Published(repo, branch, str(info.oid), want, pushed=True)


def _manifest_at(api: Any, repo: str, commit: str) -> dict[str, Any] | None:
    """The manifest.json of `repo` at `commit`; None when there is none (or it is not JSON)."""
    from huggingface_hub import errors

    try:
        path = api.hf_hub_download(repo, MANIFEST, revision=commit)
    except errors.RemoteEntryNotFoundError:
        return None
    try:
        parsed = json.loads(Path(path).read_text())
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def classify_push(
    exc: BaseException, uri: str, *, branch: str, field: str = FIELD
) -> GraftInputError | StoreError:
    """The error a failed push becomes: the user's (GraftInputError) or transient."""
    from huggingface_hub import errors

    at = f"{field} {uri}"
    repo = parse_uri(uri).netloc
    secret_hint = (
        f"name a Secret holding HF_TOKEN, a token with write access, in {field}.credentialsSecret"
        if hf_token(repo) is None
        else f"check the HF_TOKEN in {field}.credentialsSecret (it needs write access)"
    )
    if isinstance(exc, errors.RevisionNotFoundError):
        return GraftInputError(
            f"{at}: branch {branch!r} cannot be pushed to: neither it nor main exists on "
            f"{endpoint()}"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return GraftInputError(
            f"{at}: no such repository on {endpoint()}, or the token used cannot see it "
            f"({secret_hint})"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        if status == 401:
            return GraftInputError(f"{at}: the Hub refused the token (HTTP 401); {secret_hint}")
        if status == 403:
            return GraftInputError(
                f"{at}: the token may not create or write to {repo} on {endpoint()} (HTTP 403); "
                f"{secret_hint} for the organization {repo.split('/')[0]!r}"
            )
        if status in (408, 412, 429) or status >= 500 or status == 0:
            # 412: the branch moved while pushing; the next attempt reads it again.
            return StoreError(f"cannot push to {at} on {endpoint()}: HTTP {status}")
        return GraftInputError(f"{at}: the Hub refused the push (HTTP {status}): {_short(exc)}")
    return StoreError(f"cannot push to {at} on {endpoint()}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
