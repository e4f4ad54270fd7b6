"""`graft run`, `graft preflight` and bad input: clear one-line errors, exit codes, and no
manifest in the output when a run fails."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.cli import main
from graft_trainer.__main__ import main as trainer_main
from graft_trainer.__main__ import run_object
from tests.integration.trainer_kit import job_document, shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "finetunejob-local.yaml"


@pytest.fixture(scope="session")
def kit() -> dict[str, Path]:
    return shared_kit()


def _example_with_kit(kit: dict[str, Path], tmp_path: Path, **training: Any) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["model"]["uri"] = f"file://{kit['model']}"
    doc["spec"]["dataset"]["uri"] = f"file://{kit['dataset']}"
    doc["spec"]["training"].update(training)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_graft_run_example_produces_every_output(
    kit: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the example as written, with only the kit's location swapped in
    job = _example_with_kit(kit, tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(job), "--out", str(out), "--reporter", "none"]) == 0
    assert "finished at step" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
        "adapter/manifest.json",
        "metrics.json",
        "train_log.jsonl",
        "curves.png",
        "report.html",
    ):
        assert name in manifest["files"], name
        assert (out / name).is_file()
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in manifest["files"])
    assert manifest["baseModel"]["digest"].startswith("sha256:")
    assert manifest["dataset"]["digest"].startswith("sha256:")
    assert {"torch", "transformers", "peft"} <= set(manifest["libraries"])
    assert manifest["timings"]["seconds"] > 0
    assert manifest["spec"]["method"] == "lora"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["eval_loss"] < metrics["baseline"]["eval_loss"]
    assert {"accuracy", "f1"} <= set(metrics["final"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.html").read_text()
    assert "data:image/png;base64," in report and "Sample generations" in report
    assert "baseline" in report and "<td>accuracy</td>" in report
    assert json.loads((out / "adapter/manifest.json").read_text())["kind"] == "adapter"


def test_graft_run_resolves_relative_paths_and_defaults_output(
    kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project"
    shutil.copytree(kit["model"], folder / "models" / "tiny")
    shutil.copy(kit["dataset"], folder / "phrases.jsonl")
    doc = job_document(
        {"model": Path("x"), "dataset": Path("y")},
        name="relative",
        training={"maxSteps": 4, "evalSteps": 4},
    )
    doc["spec"]["model"]["uri"] = "models/tiny"
    doc["spec"]["dataset"]["uri"] = "phrases.jsonl"
    (folder / "job.yaml").write_text(yaml.safe_dump(doc))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["run", str(folder / "job.yaml"), "--reporter", "none"]) == 0
    assert (work / "graft-runs" / "relative" / "manifest.json").is_file()


def test_graft_run_refuses_unknown_kinds_and_dangling_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "other.yaml"
    path.write_text("apiVersion: graft.dev/v1alpha1\nkind: Widget\nmetadata: {name: w}\n")
    assert main(["run", str(path)]) == 2
    assert "Widget is not yet supported" in capsys.readouterr().out
    # an OptimizeJob alone: its FineTuneJob is neither in the file nor run before
    path = tmp_path / "opt.yaml"
    path.write_text((REPO / "examples" / "optimizejob.yaml").read_text())
    assert main(["run", str(path)]) == 2
    assert (
        "OptimizeJob/tone-classifier-int4: spec.source.fineTuneJobRef.name: "
        "no FineTuneJob 'tone-classifier'"
    ) in capsys.readouterr().out


def test_preflight_reports_and_fails_on_memory(
    kit: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _example_with_kit(kit, tmp_path)
    assert main(["preflight", str(job)]) == 0
    text = capsys.readouterr().out
    assert "ok: 240 train / 60 eval records" in text and "q_proj" in text
    doc = yaml.safe_load(job.read_text())
    doc["spec"]["resources"]["memory"] = "64Mi"
    job.write_text(yaml.safe_dump(doc))
    assert main(["preflight", str(job)]) == 2
    line = capsys.readouterr().out.strip()
    assert "estimated peak memory" in line and "resources.memory 64Mi" in line
    assert len(line.splitlines()) == 1


def _bad(kit: dict[str, Path], tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return job_document(kit, name="bad", **overrides)


def _expect_failure(doc: dict[str, Any], tmp_path: Path, code: int, pattern: str) -> str:
    out = tmp_path / "out"
    got, message = run_object(doc, f"file://{out}/", "none")
    assert got == code, message
    assert pattern in message, message
    assert "\n" not in message
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("manifest.json")) if out.exists() else True
    return message


def test_malformed_jsonl_row(kit: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    lines = kit["dataset"].read_text().splitlines()
    lines[6] = lines[6][:-3]
    data.write_text("\n".join(lines) + "\n")
    doc = _bad(kit, tmp_path, dataset={"uri": f"file://{data}"})
    _expect_failure(doc, tmp_path, 2, "bad.jsonl:7: malformed JSON")


def test_malformed_csv_row(kit: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "bad.csv"
    data.write_text("phrase,tone\nThe movie was great,positive\nbroken,negative,extra\n")
    doc = _bad(kit, tmp_path, dataset={"uri": f"file://{data}", "stratifyBy": None})
    doc["spec"]["dataset"].pop("stratifyBy")
    _expect_failure(doc, tmp_path, 2, "bad.csv:3: expected 2 columns")


def test_empty_split(kit: dict[str, Path], tmp_path: Path) -> None:
    doc = _bad(kit, tmp_path, dataset={"evalSplit": "train[100%:]"})
    doc["spec"]["dataset"].pop("stratifyBy")
    _expect_failure(doc, tmp_path, 2, "evalSplit 'train[100%:]' is empty")


def test_template_field_missing_from_data(kit: dict[str, Path], tmp_path: Path) -> None:
    doc = _bad(kit, tmp_path, dataset={"textTemplate": "{phrase} -> {sentiment}"})
    _expect_failure(doc, tmp_path, 2, "row 0: textTemplate field {sentiment} is missing")


def test_not_a_causal_lm(kit: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "encoder"
    shutil.copytree(kit["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (model / "config.json").write_text(json.dumps(config))
    doc = _bad(kit, tmp_path, model={"uri": f"file://{model}"})
    _expect_failure(doc, tmp_path, 2, "expected a causal language model")


def test_target_module_that_does_not_exist(kit: dict[str, Path], tmp_path: Path) -> None:
    doc = _bad(kit, tmp_path, lora={"targetModules": ["q_proj", "query_key_value"]})
    message = _expect_failure(doc, tmp_path, 2, "['query_key_value'] not in the model")
    assert "gate_proj" in message and "v_proj" in message


def test_quantization_unsupported_on_this_hardware(kit: dict[str, Path], tmp_path: Path) -> None:
    doc = _bad(kit, tmp_path, method="qlora", quantization={"bits": 8})
    _expect_failure(doc, tmp_path, 2, "bits 8 is not supported on the CPU")


def test_unreachable_store(
    kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("GRAFT_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("GRAFT_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("GRAFT_STORE_RETRY_SECONDS", "2")
    started = time.monotonic()
    code, message = run_object(_bad(kit, tmp_path), "s3://nowhere/prefix/", "none")
    assert code == 1  # transient: another pod may find the store up
    assert "cannot reach the S3 store at http://127.0.0.1:9" in message and "\n" not in message
    assert time.monotonic() - started >= 2  # kept trying for the whole retry budget


def test_trainer_entry_point_exit_codes_and_termination_log(
    kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graft_trainer.outcome as ending
    from graft.contract import decode_termination

    log = tmp_path / "termination-log"
    monkeypatch.setattr(ending, "TERMINATION_LOG", str(log))
    doc = _bad(kit, tmp_path, dataset={"textTemplate": "{phrase} -> {sentiment}"})
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("GRAFT_ARTIFACTS_URI", f"file://{tmp_path}/out/")
    monkeypatch.setenv("GRAFT_REPORTER", "none")
    assert trainer_main(["run-resource", str(path)]) == 2
    said = decode_termination(log.read_text(), "FineTuneJob")  # the contract's outcome
    assert said is not None and said.state == "Failed" and said.reason is None
    assert "{sentiment} is missing" in said.message
    monkeypatch.delenv("GRAFT_ARTIFACTS_URI")
    assert trainer_main(["run-resource", str(path)]) == 2
    assert "GRAFT_ARTIFACTS_URI" in log.read_text()
