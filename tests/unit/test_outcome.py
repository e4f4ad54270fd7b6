"""A failed export names its own reason (ParityExceeded, SmokeTestFailed, ...) on the resource,
not InvalidInput; a trainer cannot make a resource show a reason outside the list."""

from __future__ import annotations

import ast
from pathlib import Path

from graft.controller.pods import PodOutcome, failure_summary
from graft.outcome import TRAINER_REASONS, failure_text, parse_failure

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


def failed(message: str, exit_code: int = 2) -> PodOutcome:
    return PodOutcome("tune-optimize-x", "failed", "Error", message, exit_code)


def test_an_export_reason_reaches_the_condition() -> None:
    text = "spec.validate.parity.maxPerplexityIncrease: perplexity rose 50.00%, at most 10.00%"
    message = failure_text("ParityExceeded", text)
    reason, summary = failure_summary(failed(message))
    assert reason == "ParityExceeded"
    assert summary == f"{text} (exit code 2)"


def test_a_trainer_cannot_claim_another_reason() -> None:
    for forged in ("Completed: done", "PolicyDenied: no", "Succeeded: yes"):
        assert parse_failure(forged) == (None, forged)
        reason, summary = failure_summary(failed(forged))
        assert reason == "InvalidInput" and forged in summary
    # a listed reason with another exit code is not taken either
    assert failure_summary(failed("ParityExceeded: x", exit_code=1))[0] == "TrainerFailed"
    assert failure_text("Completed", "done") == "done"
