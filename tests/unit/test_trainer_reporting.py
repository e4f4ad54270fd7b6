"""Reporter factory and the JSON-lines reporter."""

from __future__ import annotations

import io
import json
import sys

import pytest

from graft.api.finetune import FineTuneMetrics, FineTuneProgress, TrainingWarning
from graft.progress import ProgressEvent
from graft_trainer.reporting import JsonlReporter, NullReporter, make_reporter


def test_jsonl_reporter_writes_one_camelcase_object_per_event() -> None:
    stream = io.StringIO()
    reporter = JsonlReporter(stream)
    reporter.report(
        ProgressEvent(
            stage="training",
            progress=FineTuneProgress(step=3, total_steps=10, tokens_per_second=12.5),
            metrics=FineTuneMetrics(train_loss=1.5, peak_memory_bytes=1024),
            warnings=[TrainingWarning(type="Overfitting", since_step=2, message="m")],
            artifacts={"adapter": "s3://b/p/adapter/"},
        )
    )
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["stage"] == "training"
    assert record["progress"] == {"step": 3, "totalSteps": 10, "tokensPerSecond": 12.5}
    assert record["metrics"] == {"trainLoss": 1.5, "peakMemoryBytes": 1024}
    assert record["warnings"] == [{"type": "Overfitting", "sinceStep": 2, "message": "m"}]
    assert record["artifacts"] == {"adapter": "s3://b/p/adapter/"}


def test_make_reporter_names() -> None:
    assert isinstance(make_reporter("jsonl"), JsonlReporter)
    assert isinstance(make_reporter("none"), NullReporter)
    with pytest.raises(ValueError, match="unknown reporter"):
        make_reporter("carrier-pigeon")
    # what pods of earlier operators were given: the operator now reads the pod's log
    assert isinstance(make_reporter("kubernetes"), JsonlReporter)


def test_the_operator_reads_what_the_jsonl_reporter_prints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from graft.controller.progress_log import latest_progress

    monkeypatch.setenv("TENANT_TOKEN", "s3cr3t-value-42")
    stream = io.StringIO()
    warning = TrainingWarning(type="Overfitting", since_step=2, message="s3cr3t-value-42")
    JsonlReporter(stream).report(
        ProgressEvent(
            stage="training",
            progress=FineTuneProgress(step=3, total_steps=10),
            warnings=[warning],
        )
    )
    fields = latest_progress(stream.getvalue())
    assert fields is not None and fields["progress"]["step"] == 3
    assert fields["warnings"][0]["message"] == "[redacted]"


def test_trainer_logs_drop_only_the_hub_kernel_hint_of_bitsandbytes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from graft_trainer.reporting import setup_logging

    setup_logging()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    handler = logging.StreamHandler(sys.stderr)
    bnb.addHandler(handler)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no module")
        bnb.warning("some other bitsandbytes warning")
    finally:
        bnb.removeHandler(handler)
    err = capsys.readouterr().err
    assert "kernels-community" not in err and "some other bitsandbytes warning" in err
