"""hf:// models and datasets through the real `huggingface_hub` client against a local server
that speaks the Hub's download protocol (tests/hub_server.py).

The fetches run in a child process, as in a trainer pod: the client reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE when it is imported. Covered: per-location tokens, datasets with
split expressions, Hub errors sorted into the user's (not retried) and transient (retried in the
pod, then exit 1), commits pinned for a rerun, offline mode, and a whole trainer run whose
adapter names its base by Hub id and commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.hub_server import HubServer
from tests.integration.trainer_kit import job_document, run_trainer_pod, shared_kit

pytestmark = [pytest.mark.trainer]

FETCH = """
import json, sys
from graft.api.base import ModelSource
from graft.api.finetune import DatasetSpec
from graft.storage import StoreError, open_store
from graft_trainer import sources
from graft_trainer.errors import GraftInputError
from graft_trainer.hub import RevisionPins

results = []
for req in json.loads(sys.argv[1]):
    pins = RevisionPins.load(req["pins"], open_store(req["pins"])) if req.get("pins") else RevisionPins()
    try:
        if req["kind"] == "model":
            out = {"path": str(sources.fetch_model(ModelSource(**req["location"]), pins))}
        else:
            splits, digest = sources.load_splits(DatasetSpec.model_validate(req["location"]), pins)
            out = {"splits": {k: len(v) for k, v in splits.items()}, "digest": digest}
        pins.save()
        out["commits"] = pins.commits
    except (GraftInputError, StoreError) as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    results.append(out)
print(json.dumps(results))
"""

LOAD_ADAPTER = """
import sys
from peft import AutoPeftModelForCausalLM
print(type(AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])).__name__)
"""

DATASET = {
    "uri": "hf://acme/phrases",
    "format": "hf",
    "trainSplit": "train[:80%]",
    "evalSplit": "test",
    "textTemplate": "{phrase} -> {tone}",
}


def child_env(hub: HubServer, home: Path, **env: str) -> dict[str, str]:
    """A child process's environment, as a trainer pod's: the local Hub, a fresh cache."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRAFT_STORE_RETRY_SECONDS": "20",
        **env,
    }


def fetch(hub: HubServer, home: Path, requests: list[dict[str, Any]], **env: str) -> list[Any]:
    """Each request's result ({path|splits, commits} or {error, message}) from one child."""
    done = subprocess.run(
        [sys.executable, "-c", FETCH, json.dumps(requests)],
        env=child_env(hub, home, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def publish_kit(hub: HubServer, *, gated_tokens: tuple[str, ...] | None = None) -> dict[str, str]:
    """The kit's model as acme/tiny-llama and its data as the dataset acme/phrases."""
    kit = shared_kit()
    rows = kit["dataset"].read_text().splitlines()
    model = hub.publish("acme/tiny-llama", kit["model"], gated_tokens=gated_tokens)
    dataset = hub.publish(
        "acme/phrases",
        {
            "data/train.jsonl": ("\n".join(rows[:-40]) + "\n").encode(),
            "data/test.jsonl": ("\n".join(rows[-40:]) + "\n").encode(),
        },
        repo_type="dataset",
    )
    return {"model": model, "dataset": dataset}


def tokens_for(hub: HubServer, repo: str) -> set[str | None]:
    return {r.token for r in hub.requests if repo in r.path}


def test_models_and_datasets_come_from_the_hub_with_their_own_tokens(tmp_path: Path) -> None:
    with HubServer() as hub:
        commits = publish_kit(hub, gated_tokens=("acme-token",))
        model, dataset = fetch(
            hub,
            tmp_path,
            [
                {"kind": "model", "location": {"uri": "hf://acme/tiny-llama"}},
                {"kind": "dataset", "location": DATASET},
            ],
            HF_TOKEN="ambient-token",
            GRAFT_HF_TOKENS=json.dumps({"acme/tiny-llama": "GRAFT_SECRET_0_HF_TOKEN"}),
            GRAFT_SECRET_0_HF_TOKEN="acme-token",
        )
        # The gated model was read with its location's own token, the dataset with HF_TOKEN.
        assert tokens_for(hub, "acme/tiny-llama") == {"acme-token"}
        assert tokens_for(hub, "acme/phrases") == {"ambient-token"}
    path = Path(model["path"])
    assert path.name == commits["model"]
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert model["commits"] == {"hf://acme/tiny-llama@main": commits["model"]}
    # Split expressions are resolved on the downloaded files; the digest names the commit.
    assert dataset["splits"] == {"train[:80%]": 208, "test": 40}
    assert dataset["digest"] == f"hf:acme/phrases@{commits['dataset']}"


def test_hub_errors_are_the_users_and_are_not_retried(tmp_path: Path) -> None:
    with HubServer() as hub:
        publish_kit(hub, gated_tokens=("acme-token",))
        unknown, gated, refused, wrong_type, split = fetch(
            hub,
            tmp_path,
            [
                {"kind": "model", "location": {"uri": "hf://acme/nothing-here"}},
                {"kind": "model", "location": {"uri": "hf://acme/tiny-llama"}},
                {
                    "kind": "model",
                    "location": {"uri": "hf://acme/tiny-llama", "credentialsSecret": "hf"},
                },
                {"kind": "model", "location": {"uri": "hf://acme/phrases"}},
                {"kind": "dataset", "location": {**DATASET, "evalSplit": "validation"}},
            ],
            HF_TOKEN="wrong-token-1234",
        )
        # One answer each: nothing the user must fix is retried (no second repo-info call).
        infos = [r.path for r in hub.requests if "/revision/" in r.path]
        assert len(infos) == 5, infos
    assert unknown["error"] == "GraftInputError", unknown
    assert "model hf://acme/nothing-here: no such repository" in unknown["message"]
    assert gated["error"] == "GraftInputError", gated
    assert "is gated" in gated["message"] and "model.credentialsSecret" in gated["message"]
    assert refused["error"] == "GraftInputError" and "is gated" in refused["message"]
    assert wrong_type["error"] == "GraftInputError", wrong_type
    assert "no such repository" in wrong_type["message"]  # acme/phrases is a dataset
    assert split["error"] == "GraftInputError", split
    assert "validation" in split["message"] and "hf://acme/phrases" in split["message"]
    for result in (unknown, gated, refused, wrong_type, split):
        assert "wrong-token" not in result["message"]


def test_a_missing_revision_names_the_field(tmp_path: Path) -> None:
    with HubServer() as hub:
        publish_kit(hub)
        (result,) = fetch(
            hub,
            tmp_path,
            [{"kind": "model", "location": {"uri": "hf://acme/tiny-llama", "revision": "v9"}}],
        )
    assert result["error"] == "GraftInputError", result
    assert "revision 'v9' does not exist" in result["message"]
    assert "model.revision" in result["message"]


def test_a_hub_outage_is_waited_out_then_reported_as_transient(tmp_path: Path) -> None:
    with HubServer() as hub:
        commits = publish_kit(hub)
        hub.fail_next(3, status=503)
        (recovered,) = fetch(
            hub, tmp_path / "a", [{"kind": "model", "location": {"uri": "hf://acme/tiny-llama"}}]
        )
        assert "path" in recovered, recovered
        assert Path(recovered["path"]).name == commits["model"]
        hub.fail_next(10_000, status=502)
        (down,) = fetch(
            hub,
            tmp_path / "b",
            [{"kind": "model", "location": {"uri": "hf://acme/tiny-llama"}}],
            GRAFT_STORE_RETRY_SECONDS="3",
        )
    # StoreError is exit code 1: the operator starts another pod (up to backoffLimit).
    assert down["error"] == "StoreError", down
    assert "model hf://acme/tiny-llama" in down["message"] and hub.url in down["message"]


def test_a_rerun_keeps_the_commit_of_the_first_attempt(tmp_path: Path) -> None:
    pins = (tmp_path / "artifacts" / "sources.json").as_uri()
    (tmp_path / "artifacts").mkdir()
    request = {"kind": "model", "location": {"uri": "hf://acme/tiny-llama"}, "pins": pins}
    with HubServer() as hub:
        first = publish_kit(hub)["model"]
        (before,) = fetch(hub, tmp_path, [request])
        files = hub.repos[("model", "acme/tiny-llama")].commits[first]
        moved = hub.publish("acme/tiny-llama", {**files, "extra.txt": b"v2"})
        (rerun, fresh) = fetch(hub, tmp_path, [request, {**request, "pins": None}])
    assert Path(before["path"]).name == first
    assert Path(rerun["path"]).name == first, "the rerun followed main to the new commit"
    assert Path(fresh["path"]).name == moved
    saved = json.loads((tmp_path / "artifacts" / "sources.json").read_text())
    assert saved == {"commits": {"hf://acme/tiny-llama@main": first}}


def test_offline_mode_reads_the_cache_and_names_what_is_missing(tmp_path: Path) -> None:
    with HubServer() as hub:
        commits = publish_kit(hub)
        fetch(hub, tmp_path, [{"kind": "model", "location": {"uri": "hf://acme/tiny-llama"}}])
        served = len(hub.requests)
        cached, missing = fetch(
            hub,
            tmp_path,
            [
                {"kind": "model", "location": {"uri": "hf://acme/tiny-llama"}},
                {"kind": "model", "location": {"uri": "hf://acme/elsewhere"}},
            ],
            HF_HUB_OFFLINE="1",
        )
        assert len(hub.requests) == served, "offline mode went to the network"
    assert Path(cached["path"]).name == commits["model"]
    assert missing["error"] == "GraftInputError", missing
    assert "offline mode is on" in missing["message"]


def test_a_trainer_run_from_the_hub_names_its_base_by_hub_id(tmp_path: Path) -> None:
    """The whole pod command with an hf:// model and dataset: the manifest records the
    commits, and the adapter's config names the base as `org/name` at that commit."""
    with HubServer() as hub:
        commits = publish_kit(hub)
        doc = job_document(
            shared_kit(),
            model={"uri": "hf://acme/tiny-llama"},
            dataset={
                "uri": "hf://acme/phrases",
                "format": "hf",
                "trainSplit": "train",
                "evalSplit": "test",
                "stratifyBy": None,
            },
            training={"maxSteps": 6, "evalSteps": 6, "loggingSteps": 3},
        )
        out = tmp_path / "out"
        done = run_trainer_pod(
            doc,
            out.as_uri(),
            tmp_path,
            HF_HUB_OFFLINE="0",
            HF_ENDPOINT=hub.url,
            HF_HOME=str(tmp_path / "hf"),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        # As a user would load the published adapter: PEFT fetches the base it names.
        adapter_dir = next(out.rglob("adapter/adapter_config.json")).parent
        served = len(hub.requests)
        loaded = subprocess.run(
            [sys.executable, "-c", LOAD_ADAPTER, str(adapter_dir)],
            # Online whatever other tests set in this process (tests/export_kit.py: offline).
            env={
                **os.environ,
                "HF_HUB_OFFLINE": "0",
                "HF_ENDPOINT": hub.url,
                "HF_HOME": str(tmp_path / "user-hf"),
            },
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        assert loaded.stdout.split()[-1] == "PeftModelForCausalLM"
        base_fetches = [r.path for r in hub.requests[served:] if "acme/tiny-llama" in r.path]
        assert any(commits["model"] in p for p in base_fetches), base_fetches
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "acme/tiny-llama"
    assert adapter_config["revision"] == commits["model"]
    manifest = json.loads(next(out.rglob("adapter/manifest.json")).read_text())
    assert manifest["baseModel"]["commit"] == commits["model"]
    assert manifest["dataset"]["digest"] == f"hf:acme/phrases@{commits['dataset']}"
    # The model card the Hub renders: front matter naming base and dataset, metrics before/after.
    card = next(out.rglob("adapter/README.md")).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "acme/tiny-llama" and front["datasets"] == ["acme/phrases"]
    assert front["library_name"] == "peft" and front["base_model_relation"] == "adapter"
    assert f"at commit `{commits['model']}`" in card
    assert "| eval_loss |" in card and manifest["files"]["README.md"]
    pins = json.loads((out / "sources.json").read_text())["commits"]
    assert pins == {
        "hf://acme/tiny-llama@main": commits["model"],
        "hf://acme/phrases@main": commits["dataset"],
    }
