"""spec.publish: the finished adapter pushed to a Hub repository through the real
`huggingface_hub` client, against the local server's upload side (tests/hub_server.py).

Pushes run in child processes, as in a trainer pod (the client reads HF_ENDPOINT when it is
imported). Covered: a job that trains, pushes and records the branch head, loaded from the Hub
with AutoPeftModelForCausalLM; a rerun that pushes nothing new; a token that cannot push
refused before training as the user's error naming spec.publish; and, on a folder without training, read-only tokens, organizations
the token may not create in, branches, a 503 on the commit and a commit whose answer was lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hub_server import HubServer
from tests.integration.test_trainer_hub import child_env, publish_kit
from tests.integration.trainer_kit import job_document, run_trainer_pod, shared_kit

pytestmark = [pytest.mark.trainer]

WRITER, READER = "writer-token-5678", "reader-token-9012"
TOKENS = {WRITER: "write", READER: "read"}

PUSH = """
import json, sys
from pathlib import Path
from graft.api.finetune import PublishLocation
from graft.storage import StoreError
from graft_trainer.errors import GraftInputError
from graft_trainer.publish import push_folder

results = []
for req in json.loads(sys.argv[1]):
    try:
        done = push_folder(Path(req["folder"]), PublishLocation(**req["location"]), message="m")
        out = done.record()
    except (GraftInputError, StoreError) as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    results.append(out)
print(json.dumps(results))
"""

# The published adapter as a user loads it, and its LoRA weights beside the local folder's.
LOAD_AND_COMPARE = """
import sys
from peft import AutoPeftModelForCausalLM, get_peft_model_state_dict
from safetensors.torch import load_file
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
hub = get_peft_model_state_dict(model)
local = load_file(sys.argv[2] + "/adapter_model.safetensors")
assert set(hub) == set(local), (sorted(hub)[:3], sorted(local)[:3])
diff = max(float((hub[k].float() - local[k].float()).abs().max()) for k in local)
print(type(model).__name__, len(local), diff)
"""


def push(hub: HubServer, home: Path, requests: list[dict[str, Any]], **env: str) -> list[Any]:
    done = subprocess.run(
        [sys.executable, "-c", PUSH, json.dumps(requests)],
        env=child_env(hub, home, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def adapter_folder(path: Path, weights: bytes = b"\x00" * 64) -> Path:
    """A folder shaped like a finished adapter, manifest included."""
    import hashlib

    path.mkdir(parents=True, exist_ok=True)
    files = {
        "adapter_model.safetensors": weights,
        "adapter_config.json": b'{"base_model_name_or_path": "acme/tiny-llama"}\n',
        "README.md": b"---\nlibrary_name: peft\n---\n# tone\n",
    }
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {
        "kind": "adapter",
        "files": {
            n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()
        },
    }
    (path / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return path


def publish_doc(publish: dict[str, Any], name: str = "tone") -> dict[str, Any]:
    return job_document(
        shared_kit(),
        name=name,
        model={"uri": "hf://acme/tiny-llama"},
        training={"maxSteps": 6, "evalSteps": 6, "loggingSteps": 3},
        publish=publish,
    )


def run_pod(hub: HubServer, doc: dict[str, Any], out: Path, work: Path, **env: str) -> Any:
    return run_trainer_pod(
        doc,
        out.as_uri(),
        work,
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=hub.url,
        HF_HOME=str(work / "hf"),
        GRAFT_REPORTER="jsonl",
        GRAFT_STORE_RETRY_SECONDS="20",
        **env,
    )


def reported_artifacts(stdout: str) -> dict[str, str]:
    """status.artifacts as the trainer last reported them (the jsonl reporter's events)."""
    from graft.contract import progress_record

    artifacts: dict[str, str] = {}
    for line in stdout.splitlines():
        record = progress_record(line)
        if record is not None:
            artifacts = record.get("artifacts") or artifacts
    return artifacts


def test_a_job_pushes_its_adapter_records_the_commit_and_a_rerun_pushes_nothing(
    tmp_path: Path,
) -> None:
    with HubServer(tokens=TOKENS) as hub:
        publish_kit(hub)
        doc = publish_doc({"uri": "hf://acme/tone-adapter", "credentialsSecret": "hf-write"})
        out = tmp_path / "out"
        done = run_pod(hub, doc, out, tmp_path, HF_TOKEN=WRITER)
        assert done.returncode == 0, done.stderr[-3000:]
        head = hub.head("acme/tone-adapter")
        assert head is not None and hub.commit_count("acme/tone-adapter") == 2
        published = f"hf://acme/tone-adapter@{head}"
        # Recorded where the other artifacts are: status.artifacts, the output manifest,
        # metrics.json, and the pod's last line.
        assert reported_artifacts(done.stdout)["published"] == published
        assert f"published {published}" in done.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["published"]["uri"] == published and manifest["published"]["pushed"]
        assert json.loads((out / "metrics.json").read_text())["published"]["commit"] == head
        # The commit holds the adapter folder exactly as the store does, manifest included.
        adapter = out / "adapter"
        on_hub = hub.files("acme/tone-adapter")
        local = {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
        assert {k: v for k, v in on_hub.items() if k != ".gitattributes"} == local
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(local)
        assert "tokenizer.json" in local and "manifest.json" in local
        assert hub.repos[("model", "acme/tone-adapter")].private

        # A user loads it by name from the Hub (the base comes from the Hub too).
        loaded = subprocess.run(
            [sys.executable, "-c", LOAD_AND_COMPARE, "acme/tone-adapter", str(adapter)],
            env={
                **os.environ,
                "HF_HUB_OFFLINE": "0",  # whatever other tests set in this process
                "HF_ENDPOINT": hub.url,
                "HF_HOME": str(tmp_path / "user-hf"),
                "HF_TOKEN": READER,
            },
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        kind, tensors, diff = loaded.stdout.split()[-3:]
        assert kind == "PeftModelForCausalLM" and int(tensors) > 0 and float(diff) == 0.0

        # The same job again on the same artifacts: the same files, so no second commit.
        again = run_pod(hub, doc, out, tmp_path, HF_TOKEN=WRITER)
        assert again.returncode == 0, again.stderr[-3000:]
        assert hub.head("acme/tone-adapter") == head
        assert hub.commit_count("acme/tone-adapter") == 2
        assert len(hub.commits_pushed("acme/tone-adapter")) == 1  # not even asked
        assert reported_artifacts(again.stdout)["published"] == published
        assert json.loads((out / "manifest.json").read_text())["published"]["pushed"] is False


def test_a_token_that_cannot_push_fails_before_training_naming_spec_publish(
    tmp_path: Path,
) -> None:
    """Checked with the Hub's whoami before any data is read: a refused token, a read-only
    one and none at all are the user's errors (exit 2), and no GPU time is spent on them."""
    with HubServer(tokens=TOKENS) as hub:
        publish_kit(hub)
        doc = publish_doc({"uri": "hf://acme/tone-adapter", "credentialsSecret": "hf-write"})
        runs = {
            name: run_pod(hub, doc, tmp_path / name, tmp_path, **env)
            for name, env in (
                ("refused", {"HF_TOKEN": "wrong-token-1234"}),
                ("read-only", {"HF_TOKEN": READER}),
                ("none", {"HF_TOKEN": ""}),
            )
        }
        pushes = [r for r in hub.requests if r.method == "POST"]
        fetched = hub.downloads("acme/tiny-llama")
    errors = {}
    for name, done in runs.items():
        assert done.returncode == 2, (name, done.stderr[-3000:])  # InvalidInput: not retried
        errors[name] = done.stderr.strip().splitlines()[-1]
        assert "spec.publish hf://acme/tone-adapter" in errors[name], errors[name]
        assert "spec.publish.credentialsSecret" in errors[name], errors[name]
        # Nothing trained or written: the check came first.
        assert not list((tmp_path / name).rglob("*.safetensors")), name
    assert "HTTP 401" in errors["refused"] and "wrong-token" not in errors["refused"]
    assert "read-only" in errors["read-only"] and READER not in errors["read-only"]
    assert "needs a token with write access" in errors["none"]
    assert not pushes and not fetched  # no repository made, not even the model downloaded


def test_push_refusals_branches_and_transient_failures(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "adapter")
    other = adapter_folder(tmp_path / "other", weights=b"\x01" * 64)
    with HubServer(tokens=TOKENS, writable_orgs=("acme",)) as hub:
        read_only, foreign, bad_branch = push(
            hub,
            tmp_path,
            [
                {"folder": str(folder), "location": {"uri": "hf://acme/tone"}},
                {"folder": str(folder), "location": {"uri": "hf://rival/tone"}},
                {"folder": str(folder), "location": {"uri": "hf://acme/tone", "revision": "v2"}},
            ],
            HF_TOKEN=READER,
        )
        for refused in (read_only, foreign, bad_branch):
            assert refused["error"] == "GraftInputError", refused
            assert "HTTP 403" in refused["message"] and READER not in refused["message"]
        assert "spec.publish hf://rival/tone" in foreign["message"]
        assert "'rival'" in foreign["message"]
        assert hub.head("acme/tone") is None

        # A 503 on the commit is retried; a commit whose answer is lost is found, not redone.
        hub.fail_next(1, 503, path_contains="/commit/")
        (first,) = push(
            hub,
            tmp_path,
            [{"folder": str(folder), "location": {"uri": "hf://acme/tone"}}],
            HF_TOKEN=WRITER,
        )
        assert first["pushed"] and first["commit"] == hub.head("acme/tone"), first
        assert hub.commit_count("acme/tone") == 2  # created with .gitattributes, then ours
        hub.lose_next_commit_answer()
        (second,) = push(
            hub,
            tmp_path,
            [{"folder": str(other), "location": {"uri": "hf://acme/tone"}}],
            HF_TOKEN=WRITER,
        )
        assert second["commit"] == hub.head("acme/tone") != first["commit"], second
        # The commit was made once: the resent request's parent was no longer the head (412),
        # and the next attempt found the files there.
        assert second["pushed"] is False
        assert hub.commit_count("acme/tone") == 3
        assert hub.files("acme/tone")["adapter_model.safetensors"] == b"\x01" * 64

        # A branch is created from main and pushed to; main stays.
        (branch,) = push(
            hub,
            tmp_path,
            [{"folder": str(folder), "location": {"uri": "hf://acme/tone", "revision": "v2"}}],
            HF_TOKEN=WRITER,
        )
        assert branch["branch"] == "v2" and branch["commit"] == hub.head("acme/tone", "v2")
        assert hub.head("acme/tone") == second["commit"]
        assert hub.files("acme/tone", "v2")["adapter_model.safetensors"] == b"\x00" * 64

        # Offline mode (the chart's trainer.hub.offline) cannot push: the user's to fix.
        (offline,) = push(
            hub,
            tmp_path,
            [{"folder": str(folder), "location": {"uri": "hf://acme/tone"}}],
            HF_TOKEN=WRITER,
            HF_HUB_OFFLINE="1",
        )
        assert offline["error"] == "GraftInputError" and "offline mode" in offline["message"]

        # An outage that outlasts the retry window is transient (exit 1, another pod).
        hub.fail_next(10_000, 502)
        (down,) = push(
            hub,
            tmp_path,
            [{"folder": str(folder), "location": {"uri": "hf://acme/tone"}}],
            HF_TOKEN=WRITER,
            GRAFT_STORE_RETRY_SECONDS="3",
        )
    assert down["error"] == "StoreError" and "spec.publish hf://acme/tone" in down["message"]
