"""KubernetesStatusReporter: only the trainer's fields, throttled, never raising."""

from __future__ import annotations

from typing import Any

import pytest

from graft.api.finetune import FineTuneMetrics, FineTuneProgress
from graft.progress import ProgressEvent
from graft_trainer.status_reporter import KubernetesStatusReporter


class FakeApi:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
        if self.fail:
            raise RuntimeError("apiserver unreachable")
        self.calls.append((*args, kwargs))


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFT_RESOURCE_KIND", "FineTuneJob")
    monkeypatch.setenv("GRAFT_RESOURCE_NAME", "tone")
    monkeypatch.setenv("GRAFT_RESOURCE_NAMESPACE", "team-a")


def event(step: int, stage: str = "training", **artifacts: str) -> ProgressEvent:
    return ProgressEvent(
        stage=stage,  # type: ignore[arg-type]
        progress=FineTuneProgress(step=step, total_steps=100, percent=step),
        metrics=FineTuneMetrics(train_loss=1.5),
        artifacts=dict(artifacts),
    )


def test_patches_only_trainer_fields_of_its_own_resource() -> None:
    api = FakeApi()
    reporter = KubernetesStatusReporter(api, clock=lambda: 0.0)
    reporter.report(event(1))
    (call,) = api.calls
    group, version, namespace, plural, name, body, kwargs = call
    assert (group, version, namespace, plural, name) == (
        "graft.dev",
        "v1alpha1",
        "team-a",
        "finetunejobs",
        "tone",
    )
    assert set(body["status"]) <= {"progress", "metrics", "warnings", "artifacts"}
    assert body["status"]["progress"]["step"] == 1 and body["status"]["progress"]["updatedAt"]
    assert body["status"]["metrics"] == {"trainLoss": 1.5}
    assert kwargs["_content_type"] == "application/merge-patch+json"


def test_throttles_but_flushes_stage_changes_artifacts_and_close() -> None:
    api = FakeApi()
    now = [0.0]
    reporter = KubernetesStatusReporter(api, clock=lambda: now[0])
    for step in range(1, 50):
        now[0] = step * 0.1
        reporter.report(event(step))
    # 4.9 s of reports every 0.1 s: the first, then about one per 2 s.
    assert len(api.calls) == 3
    reporter.report(event(50, adapter="s3://b/adapter/"))  # artifacts appear: sent at once
    assert len(api.calls) == 4
    reporter.report(event(51))
    reporter.close()
    assert api.calls[-1][5]["status"]["progress"]["step"] == 51


def test_never_raises_into_training() -> None:
    reporter = KubernetesStatusReporter(FakeApi(fail=True), clock=lambda: 0.0, retry_seconds=0)
    reporter.report(event(1))
    reporter.close()
    assert reporter.patches == 0


class Outage(FakeApi):
    """An API server that refuses every patch until `until` on the fake clock."""

    def __init__(self, clock: list[float], until: float) -> None:
        super().__init__()
        self.clock, self.until = clock, until

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
        if self.clock[0] < self.until:
            raise RuntimeError("connection refused")
        super().patch_namespaced_custom_object_status(*args, **kwargs)


def outage_reporter(until: float, budget: float) -> tuple[KubernetesStatusReporter, Outage]:
    now = [0.0]
    api = Outage(now, until)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    reporter = KubernetesStatusReporter(
        api, clock=lambda: now[0], retry_seconds=budget, sleep=sleep
    )
    return reporter, api


def test_the_last_state_lands_after_an_api_outage() -> None:
    """The run ended while the API server was down: its artifacts still reach the status."""
    reporter, api = outage_reporter(until=40.0, budget=180.0)
    reporter.report(event(100, stage="done", adapter="s3://b/adapter/"))  # refused
    assert api.calls == []
    reporter.close()  # retried with backoff until the API answers at t=40
    (call,) = api.calls
    assert call[5]["status"]["artifacts"] == {"adapter": "s3://b/adapter/"}
    assert call[5]["status"]["progress"]["step"] == 100
    assert 40.0 <= api.clock[0] <= 40.0 + 15.0


def test_the_last_state_is_given_up_after_the_budget_without_raising() -> None:
    reporter, api = outage_reporter(until=1e9, budget=60.0)
    reporter.report(event(100, stage="done", adapter="s3://b/adapter/"))
    reporter.close()
    assert api.calls == [] and 60.0 <= api.clock[0] < 61.0


def test_a_finished_exports_status_waits_out_an_outage_and_fails_after_the_budget() -> None:
    reporter, api = outage_reporter(until=30.0, budget=180.0)
    reporter.patch_status({"artifacts": {"model": "s3://b/onnx/"}})
    (call,) = api.calls
    assert call[5] == {"status": {"artifacts": {"model": "s3://b/onnx/"}}}
    reporter, api = outage_reporter(until=1e9, budget=20.0)
    with pytest.raises(
        RuntimeError, match="could not record the status of FineTuneJob team-a/tone"
    ):
        reporter.patch_status({"artifacts": {"model": "s3://b/onnx/"}})
    assert 20.0 <= api.clock[0] < 21.0
