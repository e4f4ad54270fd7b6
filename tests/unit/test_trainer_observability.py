"""The trainer's metrics endpoint without a training run: off unless configured, a port that
cannot be bound is a warning, events and steps become series, GPU figures from torch.cuda."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from graft.api.finetune import FineTuneMetrics, FineTuneProgress
from graft.progress import ProgressEvent
from graft_trainer import observability
from graft_trainer.reporting import ListReporter


@pytest.fixture(autouse=True)
def no_endpoint() -> Iterator[None]:
    observability.stop()
    yield
    observability.stop()


def samples(metrics: observability.TrainerMetrics) -> dict[tuple[str, tuple[Any, ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_off_unless_a_port_is_set_and_prometheus_client_not_even_imported() -> None:
    code = (
        "import sys, graft_trainer.observability as o\n"
        "assert o.serve_from_env({}) is None\n"
        "assert o.serve_from_env({'GRAFT_TRAINER_METRICS_PORT': '0'}) is None\n"
        "assert o.active() is None\n"
        "print('prometheus_client' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
    inner = ListReporter()
    assert observability.observed(inner) is inner
    observability.record_step(3, 100)  # nothing to record into, and no error


@pytest.mark.parametrize("raw", ["http", "70000", "-1"])
def test_a_bad_port_is_a_warning(raw: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="graft_trainer.metrics"):
        assert observability.serve_from_env({observability.PORT_ENV: raw}) is None
    assert "is not a port" in caplog.text


def test_a_port_already_bound_is_a_warning_not_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {observability.PORT_ENV: str(port), observability.HOST_ENV: "127.0.0.1"}
        with caplog.at_level(logging.WARNING, logger="graft_trainer.metrics"):
            assert observability.serve_from_env(env) is None
    assert "training goes on without it" in caplog.text
    assert observability.active() is None
    inner = ListReporter()
    assert observability.observed(inner) is inner


def test_events_and_steps_become_series_and_the_reporter_is_untouched() -> None:
    metrics = observability.TrainerMetrics()

    class Inner(ListReporter):
        def patch_status(self, status: dict[str, Any]) -> str:
            return "patched"

    inner = Inner()
    reporter = observability.ObservedReporter(inner, metrics)
    event = ProgressEvent(
        stage="training",
        progress=FineTuneProgress(step=10, total_steps=40, epoch=0.5, tokens_per_second=1234.5),
        metrics=FineTuneMetrics(train_loss=1.25, eval_loss=1.5, accuracy=0.75),
    )
    reporter.report(event)
    metrics.record_step(11, 300)
    metrics.record_step(12, 200)
    found = samples(metrics)
    assert found[("graft_trainer_step", ())] == 12
    assert found[("graft_trainer_total_steps", ())] == 40
    assert found[("graft_trainer_tokens_per_second", ())] == 1234.5
    assert found[("graft_trainer_tokens_total", ())] == 500
    assert found[("graft_trainer_loss", (("split", "train"),))] == 1.25
    assert found[("graft_trainer_loss", (("split", "eval"),))] == 1.5
    assert found[("graft_trainer_eval_score", (("metric", "accuracy"),))] == 0.75
    assert found[("graft_trainer_stage", (("graft_trainer_stage", "training"),))] == 1
    assert ("graft_trainer_eval_score", (("metric", "f1"),)) not in found  # never measured
    assert inner.events == [event]
    assert reporter.patch_status({}) == "patched"  # what a search's reporter is asked for


class FakeCuda:
    """torch.cuda of a process that uses device 1 of two."""

    def __init__(self, initialized: bool = True, utilization: bool = True) -> None:
        self.initialized, self.with_nvml = initialized, utilization

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def current_device(self) -> int:
        return 1

    def device_count(self) -> int:
        return 2

    def memory_reserved(self, device: int) -> int:
        return [0, 6 * 2**30][device]

    def memory_allocated(self, device: int) -> int:
        return [0, 4 * 2**30][device]

    def max_memory_allocated(self, device: int) -> int:
        return [0, 5 * 2**30][device]

    def get_device_properties(self, device: int) -> Any:
        return SimpleNamespace(total_memory=141 * 2**30)

    def utilization(self, device: int) -> int:
        if not self.with_nvml:
            raise ModuleNotFoundError("No module named 'pynvml'")
        return 87


def test_gpu_figures_for_the_devices_in_use_and_none_before_cuda_is() -> None:
    torch = SimpleNamespace(cuda=FakeCuda())
    (reading,) = observability.gpu_readings(torch)  # device 0 is not this process's
    assert reading == {
        "device": "1",
        "allocated": 4 * 2**30,
        "reserved": 6 * 2**30,
        "peak_allocated": 5 * 2**30,
        "total": 141 * 2**30,
        "utilization": 0.87,
    }
    assert "utilization" not in observability.gpu_readings(torch, utilization=False)[0]
    # Reading a device before the process uses CUDA would create a context on it.
    assert observability.gpu_readings(SimpleNamespace(cuda=FakeCuda(initialized=False))) == []


def test_gpu_series_leave_out_utilisation_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=FakeCuda(utilization=False)))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    found = samples(observability.TrainerMetrics())
    device = (("device", "1"),)
    assert found[("graft_trainer_gpu_memory_allocated_bytes", device)] == 4 * 2**30
    assert found[("graft_trainer_gpu_memory_reserved_bytes", device)] == 6 * 2**30
    assert found[("graft_trainer_gpu_memory_peak_allocated_bytes", device)] == 5 * 2**30
    assert found[("graft_trainer_gpu_memory_total_bytes", device)] == 141 * 2**30
    assert not any(name == "graft_trainer_gpu_utilization" for name, _ in found)
    assert found[("graft_trainer_peak_resident_memory_bytes", ())] > 0
    assert found[("graft_trainer_cpu_utilization", ())] >= 0


def test_gpu_utilisation_where_nvml_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=FakeCuda()))
    monkeypatch.setitem(sys.modules, "pynvml", SimpleNamespace())
    found = samples(observability.TrainerMetrics())
    assert found[("graft_trainer_gpu_utilization", (("device", "1"),))] == 0.87
