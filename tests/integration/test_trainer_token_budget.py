"""The engine's token budget per forward/backward (graft_trainer.memory) on the tiny Llama
(CPU): micro-batches of 16 texts run as pieces of a few texts give the losses of the same run
with whole micro-batches (1e-5 relative): the first step's (same weights), and the second's,
after an optimizer step on the pieces' gradients. Later steps are left out: at this learning
rate Adam turns float-rounding differences of near-zero gradient elements into whole updates
(measured: steps 3 and 4 differ by 4e-4 and 1e-3 relative, either way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from graft.api.kinds import FineTuneJob, parse_object
from graft_trainer import memory
from graft_trainer.engine import Engine, JobIdentity
from graft_trainer.reporting import NullReporter
from tests.integration.trainer_kit import job_document, shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]


def losses(tmp: Path, monkeypatch: pytest.MonkeyPatch, budget: int) -> list[float]:
    monkeypatch.setenv("GRAFT_TOKEN_BUDGET", str(budget))
    pieces: list[int] = []
    split = memory.split_batch

    def counting(batch: Any, b: int) -> Any:
        out = split(batch, b)
        pieces.append(len(out))
        return out

    monkeypatch.setattr(memory, "split_batch", counting)
    doc = job_document(
        shared_kit(),
        training={"maxSteps": 2, "loggingSteps": 1, "evalSteps": 1000},
        evaluation={"metrics": ["loss"]},
    )
    job = parse_object(doc)
    assert isinstance(job, FineTuneJob)
    result = Engine(job.spec, JobIdentity("budget"), f"file://{tmp}/", NullReporter()).run()
    if budget:
        assert min(pieces) > 1  # every micro-batch was cut
    else:
        assert set(pieces) == {1}
    return [h["train_loss"] for h in result.history if "train_loss" in h]


def test_pieces_train_as_whole_micro_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = losses(tmp_path / "whole", monkeypatch, 0)
    cut = losses(tmp_path / "cut", monkeypatch, 64)
    assert len(whole) == len(cut) == 2
    for a, b in zip(whole, cut, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (whole, cut)
