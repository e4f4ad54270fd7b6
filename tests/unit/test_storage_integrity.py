"""Reads from storage can be trusted or are refused: keys stay inside their folder, files match
their manifest's digests, uploads never keep old bytes because a size matches, and a
checkpoint can never run code when it is loaded."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from graft.storage import (
    IntegrityError,
    LocalStore,
    download_artifact,
    upload_dir,
    write_artifact,
)
from graft.storage.store import contained_path


@pytest.mark.parametrize(
    "key", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a//b", "./a", "a/..", ""]
)
def test_keys_that_leave_the_folder_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(IntegrityError, match="refused"):
        contained_path(tmp_path / "root", key)


def test_plain_keys_are_kept(tmp_path: Path) -> None:
    assert contained_path(tmp_path, "a/b/c.safetensors") == tmp_path / "a" / "b" / "c.safetensors"


def _artifact(tmp_path: Path) -> tuple[str, Path]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"\x00" * 64)
    (src / "sub" / "config.json").write_text('{"r": 8}')
    uri = (tmp_path / "store" / "adapter").as_uri() + "/"
    write_artifact(src, uri, {"kind": "adapter"})
    return uri, tmp_path / "store" / "adapter"


def test_an_untouched_artifact_downloads_with_its_manifest(tmp_path: Path) -> None:
    uri, stored = _artifact(tmp_path)
    (stored / "stray.txt").write_text("not in the manifest")
    local, manifest = download_artifact(uri, tmp_path / "dl")
    assert manifest["kind"] == "adapter"
    assert (local / "weights.bin").read_bytes() == b"\x00" * 64
    # only what the manifest lists is fetched, and the manifest itself
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "manifest.json",
        "sub/config.json",
        "weights.bin",
    ]
    assert json.loads((local / "manifest.json").read_text()) == manifest


def test_a_file_changed_after_its_manifest_is_refused(tmp_path: Path) -> None:
    uri, stored = _artifact(tmp_path)
    (stored / "weights.bin").write_bytes(b"\x01" * 64)  # same size, other bytes
    with pytest.raises(IntegrityError, match=r"weights.bin does not match its manifest"):
        download_artifact(uri, tmp_path / "dl")


def test_a_file_listed_but_gone_is_refused(tmp_path: Path) -> None:
    uri, stored = _artifact(tmp_path)
    (stored / "sub" / "config.json").unlink()
    with pytest.raises(IntegrityError, match=r"sub/config\.json is listed in the manifest"):
        download_artifact(uri, tmp_path / "dl")


def test_a_manifest_key_that_escapes_is_refused(tmp_path: Path) -> None:
    uri, stored = _artifact(tmp_path)
    manifest = json.loads((stored / "manifest.json").read_text())
    manifest["files"]["../../outside.txt"] = manifest["files"].pop("weights.bin")
    (stored / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="refused"):
        download_artifact(uri, tmp_path / "dl" / "deep")
    assert not (tmp_path / "outside.txt").exists()


def test_upload_rewrites_a_file_of_the_same_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"old!")
    uri = (tmp_path / "store").as_uri() + "/"
    upload_dir(src, uri, store=LocalStore())
    (src / "a.bin").write_bytes(b"new!")
    upload_dir(src, uri, store=LocalStore())
    assert (tmp_path / "store" / "a.bin").read_bytes() == b"new!"


class _Marker:
    """Unpickling this would create a file: what a forged checkpoint would try."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "pwned"))  # type: ignore[return-value]


def _checkpoint(tmp_path: Path) -> tuple[object, str, Path]:
    import torch

    from graft_trainer.checkpoints import CheckpointManager

    prefix = (tmp_path / "store" / "checkpoints").as_uri() + "/"
    manager = CheckpointManager(prefix, LocalStore(), tmp_path / "work", {"job": "a"})
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    uri = manager.save(3, dict(layer.state_dict()), optimizer, scheduler, {"step": 3}, None)
    stored = tmp_path / "store" / "checkpoints" / "step-00000003"
    return manager, uri, stored


def test_a_checkpoint_round_trips_through_safe_loading(tmp_path: Path) -> None:
    import numpy as np

    manager, uri, _ = _checkpoint(tmp_path)
    loaded = manager.load(uri)  # type: ignore[attr-defined]
    assert loaded["state"] == {"step": 3}
    assert set(loaded["trainable"]) == {"weight", "bias"}
    assert loaded["optimizer"]["state"][0]["step"] == 1
    # the RNG state restores exactly: the same draws follow
    from graft_trainer.checkpoints import rng_state, set_rng_state

    np.random.seed(5)
    before = rng_state()
    expected = np.random.rand(3)
    set_rng_state(before)
    assert np.array_equal(np.random.rand(3), expected)


def test_a_tampered_checkpoint_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    manager, uri, stored = _checkpoint(tmp_path)
    marker = tmp_path / "marker"
    payload = pickle.dumps({"weight": _Marker(str(marker))})
    (stored / "trainable.pt").write_bytes(payload)
    with pytest.raises(IntegrityError, match=r"trainable\.pt does not match its manifest"):
        manager.load(uri)  # type: ignore[attr-defined]
    assert not marker.exists()

    # Whoever can write the prefix can rewrite the manifest too: then the digests match, and
    # loading itself must refuse to run the pickle.
    from graft.storage.artifacts import file_digest

    manifest = json.loads((stored / "manifest.json").read_text())
    manifest["files"]["trainable.pt"] = {
        "sha256": file_digest(stored / "trainable.pt"),
        "size": len(payload),
    }
    (stored / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="more than tensors and plain containers"):
        manager.load(uri)  # type: ignore[attr-defined]
    assert not marker.exists()
