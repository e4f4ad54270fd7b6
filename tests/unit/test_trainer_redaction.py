"""No value of a Secret the trainer was given leaves the pod in a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from graft_trainer.outcome import RunEnd, failed, termination_message, write_termination_log
from graft_trainer.redaction import REDACTED, redact, redact_strings

ENV = {
    # from the credentials Secret (envFrom): names Graft does not choose
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY0001",
    "AWS_SECRET_ACCESS_KEY": 'wJalr"XUtnFEMI/K7MDENG\\bPxRfiCY',
    "MY_DB_PASSWORD": "hunter2hunter2",
    "GRAFT_SECRET_0_HF_TOKEN": "hf_abcdefghijklmnop",
    # configuration, kept
    "GRAFT_ARTIFACTS_URI": "s3://bucket/artifacts/team/ftj-1234/",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "HOME": "/home/graft-trainer",
    "SHORT": "abc",
}


def test_secret_values_are_redacted_and_configuration_kept() -> None:
    text = (
        'boto said: key AKIAEXAMPLEKEY0001 / secret wJalr"XUtnFEMI/K7MDENG\\bPxRfiCY at '
        "http://127.0.0.1:9000 for s3://bucket/artifacts/team/ftj-1234/ (hunter2hunter2, "
        "hf_abcdefghijklmnop) in /home/graft-trainer abc"
    )
    out = redact(text, ENV)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MY_DB_PASSWORD"):
        assert ENV[name] not in out
    assert ENV["GRAFT_SECRET_0_HF_TOKEN"] not in out
    assert out.count(REDACTED) == 4
    for kept in ("http://127.0.0.1:9000", "s3://bucket/artifacts/team/ftj-1234/", "/home/graft"):
        assert kept in out
    assert out.endswith(" abc")


def test_nested_status_bodies_are_redacted() -> None:
    body = {"message": "x hunter2hunter2", "warnings": [{"message": "AKIAEXAMPLEKEY0001"}]}
    out = redact_strings(body, ENV)
    assert out == {"message": f"x {REDACTED}", "warnings": [{"message": REDACTED}]}


def test_the_termination_message_is_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANT_TOKEN", "s3cr3t-value-42")
    path = tmp_path / "termination-log"
    write_termination_log("failed: auth with s3cr3t-value-42 refused", str(path))
    assert path.read_text() == f"failed: auth with {REDACTED} refused"
    end = failed({"kind": "OptimizeJob"}, 1, "auth with s3cr3t-value-42 refused")
    assert "s3cr3t" not in termination_message(end) and REDACTED in termination_message(end)
    assert "s3cr3t" not in termination_message(RunEnd(1, "token s3cr3t-value-42"))
