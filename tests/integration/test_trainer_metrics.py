"""The trainer's Prometheus endpoint (GRAFT_TRAINER_METRICS_PORT), scraped while a tiny run
trains and right after: in-process through run_object (the pod's code path, with the status
figures beside it) and as the pod's own process (`graft-trainer run-resource`)."""

from __future__ import annotations

import math
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from graft_trainer import observability
from graft_trainer.__main__ import run_object
from graft_trainer.outcome import event_fields
from graft_trainer.reporting import ListReporter
from tests.integration.trainer_kit import job_document, run_trainer_pod, shared_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

TRAINING = {"maxSteps": 20, "loggingSteps": 5, "evalSteps": 10}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="session")
def kit() -> dict[str, Path]:
    return shared_kit()


@pytest.fixture
def endpoint() -> Iterator[None]:
    observability.stop()
    yield
    observability.stop()  # the endpoint lives as long as its process: end it for the next test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples | None:
    """Every sample of the endpoint by (name, labels); None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Scraper:
    """Scrapes every 0.05 s from a thread until stopped, keeping what answered."""

    def __init__(self, port: int) -> None:
        self.port, self.samples = port, list[Samples]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            found = scrape(self.port)
            if found is not None:
                self.samples.append(found)
            self._stop.wait(0.05)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def steps(self) -> list[float]:
        """The step of every scrape that showed the trainer's series (a CI rehearsal once
        kept a scrape without them; the trainer registers them all before it serves)."""
        key = ("graft_trainer_step", ())
        return [s[key] for s in self.samples if key in s]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_endpoint_shows_the_run_while_it_trains_and_after(
    kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: None
) -> None:
    port = free_port()
    monkeypatch.setenv(observability.PORT_ENV, str(port))
    monkeypatch.setenv(observability.HOST_ENV, "127.0.0.1")
    events = ListReporter()
    monkeypatch.setattr("graft_trainer.reporting.make_reporter", lambda name: events)
    doc = job_document(kit, training=TRAINING)

    with Scraper(port) as scraper:
        code, message = run_object(doc, f"file://{tmp_path}/out/", "jsonl")
    assert code == 0, message
    # Scraped during the run (the endpoint is up before the model loads), never ahead of it.
    steps = scraper.steps()
    assert steps, "nothing answered on the metrics port during the run"
    assert steps == sorted(steps) and all(0 <= s <= 20 for s in steps)

    # Right after: the process still serves, with the final figures.
    samples = scrape(port)
    assert samples is not None
    assert value(samples, "graft_trainer_step") == 20
    assert value(samples, "graft_trainer_total_steps") == 20
    assert value(samples, "graft_trainer_stage", graft_trainer_stage="done") == 1
    assert value(samples, "graft_trainer_stage", graft_trainer_stage="training") == 0
    tokens_per_second = value(samples, "graft_trainer_tokens_per_second")
    assert 0 < tokens_per_second < 1e8
    assert value(samples, "graft_trainer_tokens_total") >= 20  # every step trained on tokens
    train_loss = value(samples, "graft_trainer_loss", split="train")
    eval_loss = value(samples, "graft_trainer_loss", split="eval")
    assert math.isfinite(train_loss) and train_loss > 0
    assert math.isfinite(eval_loss) and eval_loss > 0
    assert value(samples, "graft_trainer_eval_score", metric="perplexity") > 1
    assert value(samples, "graft_trainer_cpu_utilization") >= 0
    assert value(samples, "graft_trainer_resident_memory_bytes") > 2**20
    assert value(samples, "graft_trainer_peak_resident_memory_bytes") > 2**20
    assert value(samples, "process_cpu_seconds_total") > 0
    import torch

    if not torch.cuda.is_available():  # no GPU, no GPU series (rather than zeros)
        assert not any(name.startswith("graft_trainer_gpu_") for name, _ in samples)

    # The same figures as the status the trainer reports (the events that reach status).
    last = events.events[-1]
    assert last.stage == "done"
    assert last.progress.step == 20 and last.progress.tokens_per_second == tokens_per_second
    assert last.metrics.train_loss == pytest.approx(train_loss)
    assert last.metrics.eval_loss == pytest.approx(eval_loss)
    metrics = event_fields(last)["metrics"]  # what the outcome hands the operator
    assert metrics["peakHostMemoryBytes"] > 2**20
    assert metrics["peakMemoryBytes"] > 0
    if not torch.cuda.is_available():
        assert "peakGpuMemoryBytes" not in metrics and "peakGpuReservedBytes" not in metrics
        assert metrics["peakMemoryBytes"] == metrics["peakHostMemoryBytes"]
    training = [e for e in events.events if e.stage == "training" and e.metrics.train_loss]
    assert training and all(e.metrics.peak_host_memory_bytes for e in training)


def test_the_pod_process_serves_until_it_ends(kit: dict[str, Path], tmp_path: Path) -> None:
    """`graft-trainer run-resource` with the port the operator sets: scraped from outside the
    process while it trains, up to its last step."""
    port = free_port()
    doc = job_document(kit, name="scraped", training=TRAINING)
    with Scraper(port) as scraper:
        done = run_trainer_pod(
            doc,
            f"file://{tmp_path}/out/",
            tmp_path,
            GRAFT_TRAINER_METRICS_PORT=str(port),
            GRAFT_TRAINER_METRICS_HOST="127.0.0.1",
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"metrics endpoint on 127.0.0.1:{port}/metrics" in done.stderr
    steps = scraper.steps()
    assert steps and steps == sorted(steps)
    # The final evaluation and the outputs come after the last step: scrapes see it.
    assert steps[-1] == 20
    last = next(s for s in reversed(scraper.samples) if ("graft_trainer_step", ()) in s)
    assert value(last, "graft_trainer_tokens_per_second") > 0
    assert math.isfinite(value(last, "graft_trainer_loss", split="train"))
    assert scrape(port) is None  # gone with its process


def test_a_port_already_taken_does_not_stop_training(kit: dict[str, Path], tmp_path: Path) -> None:
    """In the host network another trainer pod on the node may hold the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        doc = job_document(kit, name="clash", training={**TRAINING, "maxSteps": 5})
        done = run_trainer_pod(
            doc,
            f"file://{tmp_path}/out/",
            tmp_path,
            GRAFT_TRAINER_METRICS_PORT=str(port),
            GRAFT_TRAINER_METRICS_HOST="127.0.0.1",
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "metrics endpoint not started" in done.stderr
    assert "training goes on without it" in done.stderr
