"""A local HTTP server speaking enough of the Hugging Face Hub's protocol for the real
`huggingface_hub` client to fetch models and datasets from it (`snapshot_download`,
`hf_hub_download`: repository info at a revision, the recursive tree listing, and `resolve` with
the commit and ETag headers) and to push to it (`create_repo`, `create_branch`, `upload_folder`:
`/api/repos/create`, `/api/validate-yaml`, `preupload` answering "regular" for every file so no
LFS or Xet storage is needed, and the ndjson `commit` that makes a new commit the downloads then
serve), plus the error answers the client turns into its typed errors (unknown repository, gated
repository, missing revision, missing file, refused token, server errors).

`/api/whoami-v2` tells a token's role. Pushes need a token the server was given as a writer (`tokens={"t": "write"}`): none or an
unknown one is 401, a reader's 403, and so is creating a repository outside `writable_orgs`.
A repository created private is read only with a known token.

Tests point `HF_ENDPOINT` at it (trainer pods on the local cluster reach it through the host
network). It keeps every commit, so moving `main` shows whether a rerun pins its revision, and
it records each request (method, path, whether a token came) for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class HubRepo:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    # A gated repository answers only requests bearing one of these tokens.
    gated_tokens: frozenset[str] | None = None
    # A private one (created so through the API) only requests bearing a known token.
    private: bool = False


@dataclass
class HubRequest:
    method: str
    path: str
    token: str | None


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its POSIX path relative to it."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class HubServer:
    """`with HubServer() as hub:` serves on 127.0.0.1 at `hub.url` until the block ends."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: dict[str, str] | None = None,
        writable_orgs: tuple[str, ...] | None = None,
    ) -> None:
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.requests: list[HubRequest] = []
        # token -> "read" or "write"; pushes need a writer's.
        self.tokens = dict(tokens or {})
        # Organizations a writer may create repositories in (None: any).
        self.writable_orgs = None if writable_orgs is None else frozenset(writable_orgs)
        self._failures: list[tuple[int, str | None]] = []
        self._lost_commit_answers = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ what it serves

    def publish(
        self,
        repo_id: str,
        files: dict[str, bytes] | Path,
        *,
        repo_type: str = "model",
        gated_tokens: tuple[str, ...] | None = None,
        tag: str | None = None,
    ) -> str:
        """A new commit of `repo_id` holding exactly `files`; `main` (and `tag`) move to it.
        Returns the commit id (40 hex digits)."""
        content = files_of(files) if isinstance(files, Path) else dict(files)
        with self._lock:
            repo = self.repos.setdefault(
                (repo_type, repo_id), HubRepo(repo_id=repo_id, repo_type=repo_type)
            )
            if gated_tokens is not None:
                repo.gated_tokens = frozenset(gated_tokens)
            commit = _commit(repo, content, "main")
            if tag:
                repo.refs[tag] = commit
            return commit

    def fail_next(self, count: int, status: int = 503, *, path_contains: str | None = None) -> None:
        """The next `count` requests (only those whose path contains `path_contains`, when
        given) are answered with `status` (a Hub outage)."""
        with self._lock:
            self._failures.extend([(status, path_contains)] * count)

    def lose_next_commit_answer(self, count: int = 1) -> None:
        """The next `count` commits are made, but answered 504 (an answer lost on the way)."""
        with self._lock:
            self._lost_commit_answers += count

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str | None:
        """The commit `branch` of `repo_id` points at (None: no such repository or branch)."""
        repo = self.repos.get((repo_type, repo_id))
        return repo.refs.get(branch) if repo is not None else None

    def files(
        self, repo_id: str, revision: str = "main", repo_type: str = "model"
    ) -> dict[str, bytes]:
        """The files of `repo_id` at `revision` (a branch or commit)."""
        repo = self.repos[(repo_type, repo_id)]
        return dict(repo.commits[repo.refs.get(revision, revision)])

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        """Commits `repo_id` holds (one made when it was created through the API)."""
        repo = self.repos.get((repo_type, repo_id))
        return len(repo.commits) if repo is not None else 0

    def commits_pushed(self, repo_id: str) -> list[str]:
        """Paths of the commit requests made to `repo_id` (whatever their answer)."""
        return [
            r.path for r in self.requests if r.method == "POST" and f"/{repo_id}/commit/" in r.path
        ]

    def downloads(self, repo_id: str) -> list[str]:
        """Paths of the files of `repo_id` fetched (GET on resolve) so far."""
        marker = f"{repo_id}/resolve/"
        return [
            r.path.split(marker, 1)[1]
            for r in self.requests
            if r.method == "GET" and marker in r.path
        ]

    # ------------------------------------------------------------ the protocol

    def answer(
        self, method: str, raw_path: str, token: str | None, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(HubRequest(method, raw_path, token))
            if self._failures and (
                self._failures[0][1] is None or self._failures[0][1] in raw_path
            ):
                status, _ = self._failures.pop(0)
                return status, {"X-Error-Message": "the hub is down"}, b'{"error": "down"}'
        parsed = urlparse(raw_path)
        parts = [unquote(p) for p in parsed.path.split("/") if p]
        query = parse_qs(parsed.query)
        if method == "POST":
            with self._lock:
                return self._post(parts, token, body)
        if parts == ["api", "whoami-v2"]:
            return self._whoami(token)
        if parts[:1] == ["api"] and len(parts) >= 5 and parts[1] in ("models", "datasets"):
            repo_type = parts[1][:-1]
            repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4], parts[5:]
            if action not in ("revision", "tree") or not rest:
                return _error(404, "EntryNotFound", f"no such endpoint {parsed.path}")
            return self._api(repo_type, repo_id, action, rest[0], "/".join(rest[1:]), token, query)
        repo_type = "model"
        if parts[:1] == ["datasets"]:
            repo_type, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            return self._resolve(method, repo_type, repo_id, revision, path, token)
        return _error(404, "EntryNotFound", f"no such endpoint {parsed.path}")

    def _lookup(
        self, repo_type: str, repo_id: str, revision: str, token: str | None
    ) -> tuple[HubRepo, str] | tuple[int, dict[str, str], bytes]:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and token not in self.tokens):
            return _error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        if repo.gated_tokens is not None and token not in repo.gated_tokens:
            return _error(
                401 if token is None else 403,
                "GatedRepo",
                f"Access to {repo_type} {repo_id} is restricted and you are not in the "
                "authorized list.",
            )
        commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    def _api(
        self,
        repo_type: str,
        repo_id: str,
        action: str,
        revision: str,
        path: str,
        token: str | None,
        query: dict[str, list[str]],
    ) -> tuple[int, dict[str, str], bytes]:
        found = self._lookup(repo_type, repo_id, revision, token)
        if not isinstance(found[0], HubRepo):
            return found  # type: ignore[return-value]
        repo, commit = found  # type: ignore[misc]
        files = repo.commits[commit]
        if action == "revision":
            info: dict[str, Any] = {
                "_id": commit[:24],
                "id": repo_id,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated_tokens is not None else False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": name} for name in sorted(files)],
                "lastModified": "2026-11-30T00:00:00.000Z",
            }
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        base = path.strip("/") + "/" if path.strip("/") else ""
        for name, data in sorted(files.items()):
            if not name.startswith(base):
                continue
            rest = name[len(base) :]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/", 1)[0])
                continue
            for i, _ in enumerate(rest.split("/")[:-1]):
                folders.add(base + "/".join(rest.split("/")[: i + 1]))
            entries.append(
                {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
            )
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
        return 200, {"Content-Type": "application/json"}, json.dumps(entries).encode()

    def _resolve(
        self,
        method: str,
        repo_type: str,
        repo_id: str,
        revision: str,
        path: str,
        token: str | None,
    ) -> tuple[int, dict[str, str], bytes]:
        found = self._lookup(repo_type, repo_id, revision, token)
        if not isinstance(found[0], HubRepo):
            return found  # type: ignore[return-value]
        repo, commit = found  # type: ignore[misc]
        data = repo.commits[commit].get(path)
        headers = {"X-Repo-Commit": commit}
        if data is None:
            status, error, body = _error(404, "EntryNotFound", f"{path} does not exist")
            return status, {**error, **headers}, body
        headers.update(
            {
                "ETag": f'"{git_blob_id(data)}"',
                "Content-Length": str(len(data)),
                "Content-Type": "application/octet-stream",
            }
        )
        return 200, headers, b"" if method == "HEAD" else data

    # ------------------------------------------------------------ the push protocol

    def _whoami(self, token: str | None) -> tuple[int, dict[str, str], bytes]:
        """The token's owner and role ("write" or "read"), as the Hub's /api/whoami-v2."""
        role = self.tokens.get(token) if token is not None else None
        if role is None:
            return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
        access = {"displayName": "graft-tests", "role": role}
        return _json(200, {"type": "user", "name": "graft-tests", "auth": {"accessToken": access}})

    def _writer(self, token: str | None) -> tuple[int, dict[str, str], bytes] | None:
        """None when `token` may write; the refusal otherwise."""
        role = self.tokens.get(token) if token is not None else None
        if role is None:
            return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
        if role != "write":
            return _error(403, "Forbidden", "You don't have the rights to write with this token")
        return None

    def _post(
        self, parts: list[str], token: str | None, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if parts == ["api", "validate-yaml"]:
            return _json(200, {"errors": [], "warnings": []})
        refused = self._writer(token)
        if parts == ["api", "repos", "create"]:
            if refused is not None:
                return refused
            payload = json.loads(body or b"{}")
            repo_type = payload.get("type") or "model"
            org, name = payload.get("organization"), payload.get("name")
            if not org or not name:
                return _error(400, "BadRequest", "a repository is named org/name here")
            if self.writable_orgs is not None and org not in self.writable_orgs:
                return _error(
                    403,
                    "Forbidden",
                    f"You don't have the rights to create a {repo_type} under {org}",
                )
            repo_id = f"{org}/{name}"
            url = f"{self.url}/{repo_id}"
            if (repo_type, repo_id) in self.repos:
                return _json(409, {"error": "You already created this model repo", "url": url})
            repo = HubRepo(repo_id=repo_id, repo_type=repo_type)
            repo.private = payload.get("visibility", "public") != "public" or bool(
                payload.get("private")
            )
            _commit(
                repo,
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                "main",
            )
            self.repos[(repo_type, repo_id)] = repo
            return _json(200, {"url": url, "name": repo_id, "id": repo_id})
        if len(parts) >= 6 and parts[0] == "api" and parts[1] in ("models", "datasets"):
            repo_type, repo_id = parts[1][:-1], f"{parts[2]}/{parts[3]}"
            action, revision = parts[4], "/".join(parts[5:])
            if refused is not None:
                return refused
            found = self._lookup(repo_type, repo_id, "main", token)
            if not isinstance(found[0], HubRepo):
                return found  # type: ignore[return-value]
            repo = found[0]
            if action == "branch":
                if revision in repo.refs:
                    return _error(409, "Conflict", f"Reference {revision} already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                commit = repo.refs.get(start) or (start if start in repo.commits else None)
                if commit is None:
                    return _error(404, "RevisionNotFound", f"Invalid rev id: {start}")
                repo.refs[revision] = commit
                return _json(200, {})
            head = repo.refs.get(revision)
            if head is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if action == "preupload":
                files = repo.commits[head]
                answer = []
                for entry in json.loads(body or b"{}").get("files", []):
                    existing = files.get(entry["path"])
                    answer.append(
                        {
                            "path": entry["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_id(existing) if existing is not None else None,
                        }
                    )
                return _json(200, {"files": answer, "commitOid": head})
            if action == "commit":
                return self._commit_ndjson(repo, revision, head, body)
        return _error(404, "EntryNotFound", f"no such endpoint /{'/'.join(parts)}")

    def _commit_ndjson(
        self, repo: HubRepo, branch: str, head: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        content = dict(repo.commits[head])
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                parent = value.get("parentCommit")
                if parent and parent != head:
                    return _error(412, "PreconditionFailed", "the branch moved")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return _error(400, "BadRequest", "only base64 file content is accepted")
                content[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                content.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                content = {k: v for k, v in content.items() if not k.startswith(prefix)}
            else:
                return _error(400, "BadRequest", f"{key} operations are not served here")
        commit = _commit(repo, content, branch)
        if self._lost_commit_answers:
            self._lost_commit_answers -= 1
            return _error(504, "GatewayTimeout", "the answer was lost")
        return _json(
            200,
            {
                "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit}",
                "commitOid": commit,
                "success": True,
            },
        )


def _commit(repo: HubRepo, content: dict[str, bytes], branch: str) -> str:
    """A new commit of `repo` holding exactly `content`; `branch` moves to it."""
    digest = hashlib.sha1(repr((repo.repo_id, len(repo.commits))).encode())
    for path, data in sorted(content.items()):
        digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
    commit = digest.hexdigest()
    repo.commits[commit] = content
    repo.refs[branch] = commit
    return commit


def _json(status: int, body: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
    return status, headers, json.dumps({"error": message}).encode()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method: str) -> None:
            auth = self.headers.get("Authorization") or ""
            token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
            length = int(self.headers.get("Content-Length") or 0)
            sent = self.rfile.read(length) if length else b""
            status, headers, body = hub.answer(method, self.path, token, sent)
            start = _range_start(self.headers.get("Range"), status, len(body))
            if start:
                body, status = body[start:], 206
                headers = {**headers, "Content-Length": str(len(body))}
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _range_start(header: str | None, status: int, size: int) -> int:
    """The first byte a `Range: bytes=N-` request asks for (0: the whole body)."""
    if not header or status != 200 or not header.startswith("bytes="):
        return 0
    first = header[len("bytes=") :].split("-", 1)[0]
    return int(first) if first.isdigit() and int(first) < size else 0
