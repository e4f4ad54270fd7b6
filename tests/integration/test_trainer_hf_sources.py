"""hf:// models through the real huggingface_hub code path, offline: a hub cache holding the
kit's model (as a download would have left it) serves `fetch_model`, with the repository's
own token when its location names a Secret of its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from graft.api.base import ModelSource
from graft.storage import StoreError
from tests.integration.trainer_kit import shared_kit

pytestmark = [pytest.mark.trainer]

COMMIT = "0" * 39 + "1"


def hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """The layout huggingface_hub leaves behind: refs/main -> snapshots/<commit>/files."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_an_hf_model_resolves_offline_with_its_own_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from graft_trainer import sources

    kit = shared_kit()
    cache = tmp_path / "hub"
    snapshot = hub_cache(cache, "acme/tiny-llama", kit["model"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", "ambient-token")
    monkeypatch.setenv(
        "GRAFT_HF_TOKENS", json.dumps({"acme/tiny-llama": "GRAFT_SECRET_0_HF_TOKEN"})
    )
    monkeypatch.setenv("GRAFT_SECRET_0_HF_TOKEN", "acme-token")
    tokens: list[Any] = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id: str, **kwargs: Any) -> str:
        tokens.append(kwargs.get("token"))
        return str(real(repo_id, cache_dir=str(cache), **kwargs))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    found = sources.fetch_model(ModelSource(uri="hf://acme/tiny-llama"))
    assert found.resolve() == snapshot.resolve()
    assert (found / "config.json").is_file()
    assert tokens == ["acme-token"]
    # A repository that is not in the cache fails as an unreachable store, naming the URI.
    with pytest.raises(StoreError, match="hf://acme/missing"):
        sources.fetch_model(ModelSource(uri="hf://acme/missing"))
    assert tokens[-1] == "ambient-token"
