"""`graft run` on examples/quickstart-local.yaml: two FineTuneJobs, an OptimizeJob and an
AdapterBundle that reference them by name, run locally in dependency order; a dangling
reference is refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.cli import main
from tests.integration.trainer_kit import shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]

pytest.importorskip("onnxruntime_genai")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "quickstart-local.yaml"
KINDS = ["FineTuneJob", "FineTuneJob", "OptimizeJob", "AdapterBundle"]


@pytest.fixture(scope="module")
def kit() -> dict[str, Path]:
    return shared_kit()


def _with_kit(kit: dict[str, Path], docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] == "FineTuneJob":
            doc["spec"]["model"]["uri"] = f"file://{kit['model']}"
            doc["spec"]["dataset"]["uri"] = f"file://{kit['dataset']}"
    return docs


def _write(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_quickstart_chain_runs_in_dependency_order(
    kit: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    docs = _with_kit(kit, list(yaml.safe_load_all(EXAMPLE.read_text())))
    # the bundle first in the file: the order comes from the references, not the file
    docs = docs[3:] + docs[:3]
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(_write(tmp_path / "chain.yaml", docs)), "--reporter", "none"]) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "graft-runs"
    names = ["quick-classifier", "quick-classifier-b", "quick-classifier-int4", "quick-bundle"]
    for name in names:
        assert (runs / name / "manifest.json").is_file(), name
    lines = out.splitlines()
    at = {
        key: next(i for i, ln in enumerate(lines) if ln.startswith(f"{key}:"))
        for key in [f"{k}/{n}" for k, n in zip(KINDS, names, strict=True)]
    }
    for job in ("FineTuneJob/quick-classifier", "FineTuneJob/quick-classifier-b"):
        assert at[job] < at["AdapterBundle/quick-bundle"], out
    assert at["FineTuneJob/quick-classifier"] < at["OptimizeJob/quick-classifier-int4"], out
    assert (runs / "quick-classifier" / "adapter" / "manifest.json").is_file()
    optimize = json.loads((runs / "quick-classifier-int4" / "manifest.json").read_text())
    assert "model.onnx" in optimize["files"]
    bundle = json.loads((runs / "quick-bundle" / "manifest.json").read_text())
    for adapter in ("classifier", "classifier-b"):
        assert f"adapters/{adapter}.onnx_adapter" in bundle["files"], adapter
        assert (runs / "quick-bundle" / "adapters" / f"{adapter}.onnx_adapter").is_file()
        assert f"  {adapter}: rank 8, smoke test passed" in out, out
    assert "4 resources finished" in out

    # a later file reuses the finished FineTuneJob by name, and takes an adapter by plain path
    later = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "AdapterBundle",
        "metadata": {"name": "quick-bundle-later"},
        "spec": {
            "baseModel": {"uri": str(kit["model"])},
            "adapters": [
                {"name": "by-ref", "fineTuneJobRef": {"name": "quick-classifier-b"}},
                {"name": "by-path", "uri": "graft-runs/quick-classifier/adapter"},
            ],
            "target": {"device": "cpu", "precision": "fp32"},
            "validate": {"prompts": ["<|user|>\nWhat a day<|end|>\n<|assistant|>\n"]},
        },
    }
    assert main(["run", str(_write(tmp_path / "later.yaml", [later])), "--reporter", "none"]) == 0
    out = capsys.readouterr().out
    assert "  by-ref: rank 8, smoke test passed" in out, out
    assert "  by-path: rank 8, smoke test passed" in out, out
    assert (runs / "quick-bundle-later" / "manifest.json").is_file()


def test_dangling_reference_is_refused_before_anything_runs(
    kit: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    docs = _with_kit(kit, list(yaml.safe_load_all(EXAMPLE.read_text())))
    docs[3]["spec"]["adapters"][1]["fineTuneJobRef"]["name"] = "nowhere"
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "dangling.yaml", docs)
    assert main(["run", str(path), "--reporter", "none"]) == 2
    out = capsys.readouterr().out
    assert (
        "error: AdapterBundle/quick-bundle: spec.adapters[1].fineTuneJobRef.name: "
        f"no FineTuneJob 'nowhere' in {path}"
    ) in out, out
    assert not list(tmp_path.rglob("manifest.json"))

    optimize = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "OptimizeJob",
        "metadata": {"name": "orphan"},
        "spec": {"source": {"fineTuneJobRef": {"name": "missing"}}},
    }
    path = _write(tmp_path / "orphan.yaml", [optimize])
    assert main(["run", str(path), "--reporter", "none"]) == 2
    out = capsys.readouterr().out
    assert "OptimizeJob/orphan: spec.source.fineTuneJobRef.name: no FineTuneJob 'missing'" in out
    assert not (tmp_path / "graft-runs").exists()
