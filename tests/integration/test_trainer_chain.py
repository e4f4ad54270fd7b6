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
from graft_trainer.evaluation import normalize
from graft_trainer.testkit import label_of
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
    names = ["quick-classifier", "quick-verdict", "quick-classifier-int4", "quick-bundle"]
    for name in names:
        assert (runs / name / "manifest.json").is_file(), name
    lines = out.splitlines()
    at = {
        key: next(i for i, ln in enumerate(lines) if ln.startswith(f"{key}:"))
        for key in [f"{k}/{n}" for k, n in zip(KINDS, names, strict=True)]
    }
    for job in ("FineTuneJob/quick-classifier", "FineTuneJob/quick-verdict"):
        assert at[job] < at["AdapterBundle/quick-bundle"], out
    assert at["FineTuneJob/quick-classifier"] < at["OptimizeJob/quick-classifier-int4"], out
    assert (runs / "quick-classifier" / "adapter" / "manifest.json").is_file()
    optimize = json.loads((runs / "quick-classifier-int4" / "manifest.json").read_text())
    assert "model.onnx" in optimize["files"]
    bundle = json.loads((runs / "quick-bundle" / "manifest.json").read_text())
    for adapter in ("tone", "verdict"):
        assert f"adapters/{adapter}.onnx_adapter" in bundle["files"], adapter
        assert (runs / "quick-bundle" / "adapters" / f"{adapter}.onnx_adapter").is_file()
        assert f"  {adapter}: rank 8, smoke test passed" in out, out
    assert "4 resources finished" in out
    # Both fine-tunes learned their task (measured 1.0 and 0.97-1.0 after 80 steps on AVX2 and
    # AVX-512), and through onnxruntime-genai on the int4 base each adapter answers every
    # validation prompt with its own task's label: the two differ on each prompt.
    for job in ("quick-classifier", "quick-verdict"):
        metrics = json.loads((runs / job / "metrics.json").read_text())
        assert metrics["final"]["accuracy"] >= 0.9, (job, metrics["final"])
    generations = {a["name"]: a["generations"] for a in bundle["adapters"]}
    for task in ("tone", "verdict"):
        assert len(generations[task]) == 3
        for gen in generations[task]:
            assert normalize(gen["output"]) == label_of(gen["prompt"], task), (task, gen)

    # a later file reuses the finished FineTuneJob by name, and takes an adapter by plain path
    later = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "AdapterBundle",
        "metadata": {"name": "quick-bundle-later"},
        "spec": {
            "baseModel": {"uri": str(kit["model"])},
            "adapters": [
                {"name": "by-ref", "fineTuneJobRef": {"name": "quick-verdict"}},
                {"name": "by-path", "uri": "graft-runs/quick-classifier/adapter"},
            ],
            "target": {"device": "cpu", "precision": "fp32"},
            "validate": {"prompts": ["<|user|>\nThe movie was wonderful<|end|>\n<|assistant|>\n"]},
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


def test_pod_runs_an_optimizejob_from_the_references_the_operator_froze(
    kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator-trainer contract without a cluster: the FineTuneJob runs as its pod would,
    the operator's planner and gate freeze the OptimizeJob's resource.json, the trainer's
    run-resource exports from it and ends with its outcome in the termination message, and the
    operator's status computation takes the status fields from that message."""
    from datetime import UTC, datetime

    from graft.controller import planner, sources
    from graft.controller.config import OperatorConfig
    from graft.controller.status import Observed, compute_status
    from graft_trainer import __main__ as trainer_main
    from graft_trainer import outcome as ending

    config = OperatorConfig(trainer_image="t", output_uri=f"file://{tmp_path}/store")
    docs = _with_kit(kit, list(yaml.safe_load_all(EXAMPLE.read_text())))
    ftj, optj = docs[0], docs[2]
    for obj, uid in ((ftj, "1111aaaa-0000"), (optj, "2222bbbb-0000")):
        obj["metadata"].update(namespace="team", uid=uid)

    def pod_env(obj: dict[str, Any], refs: dict[str, Any] | None) -> tuple[Path, dict[str, str]]:
        resolved = planner.resolve_spec(obj["spec"], config, obj["kind"])
        cm = planner.build_spec_configmap(obj, resolved, refs)
        job = planner.build_trainer_job(
            obj, resolved.spec, config, spec_hash_=resolved.spec_hash, references=refs
        )
        path = tmp_path / f"{obj['metadata']['name']}.json"
        path.write_text(cm["data"]["resource.json"])
        container = job["spec"]["template"]["spec"]["containers"][0]
        return path, {e["name"]: e["value"] for e in container["env"] if e["name"] != "HOME"}

    termination = tmp_path / "termination-log"
    monkeypatch.setattr(ending, "TERMINATION_LOG", str(termination))
    path, env = pod_env(ftj, None)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert trainer_main.main(["--log-format", "text", "run-resource", str(path)]) == 0

    ftj["status"] = {
        "phase": "Succeeded",
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed"}],
    }
    gate = sources.gate("OptimizeJob", "team", optj["spec"], {ftj["metadata"]["name"]: ftj}, config)
    assert gate.state == "ready", gate.message
    path, env = pod_env(optj, gate.references)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert trainer_main.main(["--log-format", "text", "run-resource", str(path)]) == 0

    artifacts = env["GRAFT_ARTIFACTS_URI"]
    assert artifacts == f"file://{tmp_path}/store/team/optimizejobs/quick-classifier-int4-2222bbbb/"
    out = Path(artifacts.removeprefix("file://"))
    assert "model.onnx" in json.loads((out / "manifest.json").read_text())["files"]
    # The pod as the kubelet shows it once it exits 0, and the operator's status from it.
    message = termination.read_text()
    assert len(message.encode()) <= 4096
    pod = {
        "metadata": {"name": "quick-classifier-int4-optimize-x"},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": message}}}
            ],
        },
    }
    job = {
        "metadata": {"name": "quick-classifier-int4-optimize", "uid": "j", "annotations": {}},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    optj["metadata"]["generation"] = 1
    observed = Observed(launched_hash="h", current_hash="h", job=job, pods=(pod,))
    status = compute_status(optj, observed, datetime.now(UTC)).status
    assert status["phase"] == "Succeeded"
    assert status["artifacts"] == {"model": artifacts}
    assert status["metrics"]["sizeBytes"] > 0 and status["metrics"]["decodeTokensPerSecond"] > 0
    assert status["generations"][0]["prompt"].startswith("<|user|>")
    # the whole outcome beside the artifacts
    assert json.loads((out / "outcome.json").read_text())["artifacts"] == {"model": artifacts}

    # The same export failing its parity check: exit code 2, and the operator shows the
    # export's own reason, not InvalidInput.
    from graft_trainer.export import validate as checks

    real = checks.perplexity_onnx
    monkeypatch.setattr(checks, "perplexity_onnx", lambda *a, **k: real(*a, **k) * 10)
    optj["spec"]["validate"] = {"parity": {"maxPerplexityIncrease": 0.1}}
    path, env = pod_env(optj, gate.references)
    assert trainer_main.main(["--log-format", "text", "run-resource", str(path)]) == 2
    failed = {**pod["status"], "phase": "Failed"}
    failed["containerStatuses"] = [
        {
            "name": "trainer",
            "state": {
                "terminated": {"exitCode": 2, "reason": "Error", "message": termination.read_text()}
            },
        }
    ]
    job["status"] = {}
    observed = Observed(
        launched_hash="h", current_hash="h", job=job, pods=({**pod, "status": failed},)
    )
    status = compute_status(optj, observed, datetime.now(UTC)).status
    failure = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failure["status"], failure["reason"]) == ("True", "ParityExceeded"), failure
    assert "spec.validate.parity.maxPerplexityIncrease" in failure["message"]
