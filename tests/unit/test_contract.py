"""The operator-trainer contract (graft.contract): a trainer's outcome fits the termination
message, reaches the conditions with its own reason (ParityExceeded, ...), fills only what the
kind's status accepts, and a trainer cannot claim a reason outside the list."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from graft.contract import (
    TERMINATION_MESSAGE_LIMIT,
    TRAINER_REASONS,
    TrainerOutcome,
    decode_termination,
    encode_termination,
    progress_record,
)
from graft.controller.pods import PodOutcome, classify_pod, failure_summary
from graft.controller.progress_log import latest_progress

REPO = Path(__file__).resolve().parents[2]


def reasons_raised_by_the_export_stages() -> set[str]:
    """Every CamelCase reason an ExportError(...) is given in trainer-image/."""
    found: set[str] = set()
    for path in (REPO / "trainer-image" / "graft_trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ExportError"):
                continue
            values = [*node.args[2:3], *(k.value for k in node.keywords if k.arg == "reason")]
            for value in values:
                assert isinstance(value, ast.Constant), f"{path}:{node.lineno}: reason not literal"
                found.add(str(value.value))
    return found


def test_every_reason_the_export_raises_is_one_the_operator_takes() -> None:
    raised = reasons_raised_by_the_export_stages()
    assert {"ParityExceeded", "SmokeTestFailed", "BaseModelMismatch"} <= raised
    assert raised <= TRAINER_REASONS, raised - TRAINER_REASONS


def failed_pod(message: str, exit_code: int = 2) -> PodOutcome:
    pod = {
        "metadata": {"name": "tune-optimize-x"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {"exitCode": exit_code, "reason": "Error", "message": message}
                    },
                }
            ],
        },
    }
    return classify_pod(pod)


def test_an_export_reason_reaches_the_condition() -> None:
    text = "spec.validate.parity.maxPerplexityIncrease: perplexity rose 50.00%, at most 10.00%"
    outcome = TrainerOutcome(
        kind="OptimizeJob", state="Failed", reason="ParityExceeded", message=text
    )
    reason, summary = failure_summary(failed_pod(encode_termination(outcome)))
    assert reason == "ParityExceeded"
    assert summary == f"{text} (exit code 2)"


def test_a_trainer_cannot_claim_another_reason() -> None:
    for forged in ("Completed", "PolicyDenied", "Succeeded"):
        with pytest.raises(ValidationError, match="not one a trainer may report"):
            TrainerOutcome(kind="OptimizeJob", state="Failed", reason=forged, message="x")
        text = json.dumps({"kind": "OptimizeJob", "state": "Failed", "reason": forged})
        assert decode_termination(text) is None
        reason, summary = failure_summary(failed_pod(text))
        assert reason == "InvalidInput" and forged in summary
    # plain text (a crash before the outcome was written) is shown as it is
    assert failure_summary(failed_pod("ParityExceeded: x"))[0] == "InvalidInput"
    # a listed reason with another exit code is not taken either
    outcome = TrainerOutcome(kind="OptimizeJob", state="Failed", reason="ParityExceeded")
    assert failure_summary(failed_pod(encode_termination(outcome), 1))[0] == "TrainerFailed"


def test_an_outcome_fills_only_fields_its_kind_has() -> None:
    with pytest.raises(ValidationError):  # an OptimizeJob has no adapter artifact
        TrainerOutcome(kind="OptimizeJob", state="Succeeded", artifacts={"adapter": "s3://b/a/"})
    with pytest.raises(ValidationError):  # nor a FineTuneJob a metric of another name
        TrainerOutcome(kind="FineTuneJob", state="Succeeded", metrics={"speed": 3})
    outcome = TrainerOutcome(
        kind="FineTuneJob",
        state="Succeeded",
        artifacts={"adapter": "s3://b/p/adapter/"},
        metrics={"evalLoss": 1.5},
    )
    assert outcome.status_fields() == {
        "artifacts": {"adapter": "s3://b/p/adapter/"},
        "metrics": {"evalLoss": 1.5},
        "warnings": [],
    }
    assert decode_termination(encode_termination(outcome), "OptimizeJob") is None


def test_a_large_outcome_is_shortened_to_fit_the_termination_message() -> None:
    generations = [{"prompt": "p" * 300, "output": "ü" * 900} for _ in range(30)]
    outcome = TrainerOutcome.model_validate(
        {
            "kind": "AdapterBundle",
            "state": "Succeeded",
            "message": "m" * 5000,
            "artifacts": {
                "model": "s3://b/p/model/",
                "adapters": {f"a{i}": f"s3://b/p/a{i}.onnx_adapter" for i in range(20)},
            },
            "generations": generations,
            "adapters": [
                {"name": f"a{i}", "smokeTest": "passed", "generations": generations[:2]}
                for i in range(3)
            ],
        }
    )
    text = encode_termination(outcome)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    back = decode_termination(text, "AdapterBundle")
    assert back is not None and back.truncated
    # what status needs most survives: every artifact and adapter verdict
    assert back.artifacts == outcome.artifacts
    assert [a.smoke_test for a in back.adapters] == ["passed"] * 3
    small = TrainerOutcome(kind="OptimizeJob", state="Succeeded", message="ok")
    assert not decode_termination(encode_termination(small)).truncated  # type: ignore[union-attr]


def test_progress_comes_from_the_newest_well_formed_record_in_the_log() -> None:
    def record(step: int, **extra: object) -> str:
        body = {"ts": "2026-01-01T00:00:00Z", "event": "progress", "stage": "training"}
        body |= {"progress": {"step": step, "totalSteps": 10}, "metrics": {"trainLoss": 2.0}}
        return json.dumps(body | extra)

    log = "\n".join(
        [
            record(3),
            '{"level": "info", "message": "saved checkpoint"}',
            record(4),
            record(5, metrics={"trainLoss": "not a number"}),  # malformed: skipped
            "plain text",
        ]
    )
    fields = latest_progress(log)
    assert fields is not None
    assert fields["progress"] == {"step": 4, "totalSteps": 10, "updatedAt": "2026-01-01T00:00:00Z"}
    assert fields["metrics"] == {"trainLoss": 2.0}
    assert latest_progress("no records here\n") is None
    assert progress_record('{"event": "log", "progress": 1}') is None
