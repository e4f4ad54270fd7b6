"""Trials finishing together each redraw the one study report: the last write must be whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from graft import search_plan as plan
from graft.api.search import SearchSpec
from graft.storage.store import LocalStore
from graft_trainer import search_report, search_trial

SEARCH = SearchSpec.model_validate(
    {
        "trials": 3,
        "space": {"lora.r": {"type": "choice", "values": [4, 8]}},
    }
)


BASE: dict[str, Any] = {"model": {}}


def finished(number: int, value: float) -> bytes:
    trial = plan.StudyTrial(
        number=number,
        params={"lora.r": 4},
        state="Complete",
        value=value,
        study=plan.study_fingerprint(BASE),
    )
    return json.dumps(trial.to_json()).encode()


class RacingStore(LocalStore):
    """The real local store, where another trial's pod finishes between this pod's listing and
    its first report write."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.report_writes: list[str] = []

    def write_bytes(self, uri: str, data: bytes) -> None:
        super().write_bytes(uri, data)
        if uri.endswith(plan.REPORT_FILE):
            self.report_writes.append(data.decode())
            if len(self.report_writes) == 1:
                super().write_bytes(search_trial.record_uri(self.prefix, 1), finished(1, 0.4))


def test_a_trial_that_finished_during_the_redraw_is_in_the_final_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def render(name: str, search: Any, study: plan.Study, best: int | None) -> str:
        return f"trials={sorted(t.number for t in study.trials)} best={best}"

    monkeypatch.setattr(search_report, "render_search_report", render)
    prefix = f"file://{tmp_path}/ns/FineTuneJob/a-uid/"
    store = RacingStore(prefix)
    store.write_bytes(search_trial.record_uri(prefix, 0), finished(0, 0.5))
    search_trial._redraw_report(store, prefix, "a", SEARCH, 3, plan.study_fingerprint(BASE))
    assert store.report_writes == ["trials=[0] best=0", "trials=[0, 1] best=1"]
    assert store.read_bytes(prefix + plan.REPORT_FILE) == b"trials=[0, 1] best=1"
