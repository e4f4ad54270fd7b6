"""The trainer's Prometheus endpoint: live figures of a run for a PodMonitor to scrape.

`serve_from_env()` starts it once per process when GRAFT_TRAINER_METRICS_PORT names a port
other than 0 (the operator sets it from the chart's `trainer.metrics.port`), on
GRAFT_TRAINER_METRICS_HOST (default 0.0.0.0). It serves until the process ends, so a scrape
right after the last step still sees the final figures. A port that cannot be bound (in the
host network, another trainer pod on the node may hold it) is a warning in the log: training
never depends on its endpoint.

Progress comes through the same events as the resource's status (a `Reporter` teed by
`observed`), and the step and token counts from the engine after every optimizer step
(`record_step`). CPU, memory and GPU figures are read when scraped:

| metric | meaning |
|---|---|
| graft_trainer_stage{graft_trainer_stage} | 1 for the run's current stage (preflight ... done) |
| graft_trainer_step | optimizer steps done |
| graft_trainer_total_steps | steps planned |
| graft_trainer_epoch | passes over the training data so far |
| graft_trainer_eta_seconds | estimated time left |
| graft_trainer_tokens_per_second | throughput over the last logging window |
| graft_trainer_tokens_total | tokens trained on by this process (counter) |
| graft_trainer_loss{split} | latest train loss (logging steps) and eval loss (evaluations) |
| graft_trainer_eval_score{metric} | latest perplexity, accuracy, f1, bleu, rouge |
| graft_trainer_cpu_utilization | CPU seconds of the process per second since the previous scrape (1 = one core) |
| graft_trainer_resident_memory_bytes | resident memory (RSS) of the process now |
| graft_trainer_peak_resident_memory_bytes | its peak so far |
| graft_trainer_gpu_memory_{allocated,reserved,peak_allocated,total}_bytes{device} | PyTorch's allocator per CUDA device in use (only once CUDA is in use) |
| graft_trainer_gpu_utilization{device} | fraction of time a kernel ran (NVML; only where nvidia-ml-py is installed) |

Beside them, prometheus_client's `process_*` series (CPU seconds, RSS, open files). The device
label is the CUDA index inside the container; in data parallel runs rank 0 serves and sees its
own GPU and process only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from graft.contract import ENV_METRICS_PORT
from graft.progress import ProgressEvent, Reporter

log = logging.getLogger("graft_trainer.metrics")

PORT_ENV = ENV_METRICS_PORT
HOST_ENV = "GRAFT_TRAINER_METRICS_HOST"
STAGES = ("preflight", "loading", "baseline", "training", "evaluating", "exporting", "done")
EVAL_SCORES = ("perplexity", "accuracy", "f1", "bleu", "rouge")


def _resident_bytes() -> int | None:
    """The process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_resident_bytes() -> int:
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def gpu_readings(torch: Any, utilization: bool = True) -> list[dict[str, Any]]:
    """Per CUDA device this process uses: its allocator's figures and, with NVML, utilisation.

    Nothing before the process has used CUDA (reading a device never used would cost a CUDA
    context on it); devices the allocator never touched are left out, except the current one.
    """
    cuda = torch.cuda
    if not (cuda.is_available() and cuda.is_initialized()):
        return []
    current = cuda.current_device()
    readings = []
    for device in range(cuda.device_count()):
        reserved = int(cuda.memory_reserved(device))
        if not reserved and device != current:
            continue
        reading: dict[str, Any] = {
            "device": str(device),
            "allocated": int(cuda.memory_allocated(device)),
            "reserved": reserved,
            "peak_allocated": int(cuda.max_memory_allocated(device)),
            "total": int(cuda.get_device_properties(device).total_memory),
        }
        if utilization:
            # torch maps the CUDA index to NVML's (CUDA_VISIBLE_DEVICES); it needs pynvml.
            reading["utilization"] = float(cuda.utilization(device)) / 100.0
        readings.append(reading)
    return readings


class _LiveCollector:
    """What is read at scrape time: CPU, memory, GPU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (time.monotonic(), time.process_time())
        self._cpu = 0.0
        # NVML only where nvidia-ml-py is installed: utilisation is left out otherwise.
        self._nvml: bool | None = None

    def _cpu_utilization(self) -> float:
        with self._lock:
            wall, cpu = time.monotonic(), time.process_time()
            elapsed = wall - self._last[0]
            if elapsed >= 0.5:  # scrapes close together repeat the last figure
                self._cpu = max(0.0, (cpu - self._last[1]) / elapsed)
                self._last = (wall, cpu)
            return self._cpu

    def _gpu(self) -> list[dict[str, Any]]:
        torch = sys.modules.get("torch")  # never imported here: only once training has it
        if torch is None:
            return []
        if self._nvml is None:
            try:
                import pynvml  # noqa: F401

                self._nvml = True
            except ImportError:
                self._nvml = False
        try:
            return gpu_readings(torch, utilization=self._nvml)
        except Exception as exc:
            if self._nvml:  # NVML refused (no driver library, ...): go on without it
                log.warning("GPU utilisation unavailable, left out of the metrics: %s", exc)
                self._nvml = False
                with contextlib.suppress(Exception):
                    return gpu_readings(torch, utilization=False)
            return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "graft_trainer_cpu_utilization",
            "CPU seconds the trainer process used per second since the previous scrape "
            "(1 = one core busy).",
            value=self._cpu_utilization(),
        )
        rss = _resident_bytes()
        if rss is not None:
            yield GaugeMetricFamily(
                "graft_trainer_resident_memory_bytes",
                "Resident memory (RSS) of the trainer process.",
                value=rss,
            )
        yield GaugeMetricFamily(
            "graft_trainer_peak_resident_memory_bytes",
            "Peak resident memory (RSS) of the trainer process so far.",
            value=_peak_resident_bytes(),
        )
        readings = self._gpu()
        if not readings:
            return
        for key, name, text in (
            ("allocated", "allocated_bytes", "GPU memory held by tensors."),
            ("reserved", "reserved_bytes", "GPU memory held by PyTorch's caching allocator."),
            ("peak_allocated", "peak_allocated_bytes", "Peak GPU memory held by tensors."),
            ("total", "total_bytes", "The GPU's memory."),
        ):
            family = GaugeMetricFamily(f"graft_trainer_gpu_memory_{name}", text, labels=["device"])
            for r in readings:
                family.add_metric([r["device"]], r[key])
            yield family
        if any("utilization" in r for r in readings):
            family = GaugeMetricFamily(
                "graft_trainer_gpu_utilization",
                "Fraction of the last sample period in which a kernel ran on the GPU (NVML).",
                labels=["device"],
            )
            for r in readings:
                if "utilization" in r:
                    family.add_metric([r["device"]], r["utilization"])
            yield family


class TrainerMetrics:
    """The trainer's series on a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, ProcessCollector

        self.registry = CollectorRegistry()
        r = self.registry
        self.stage = Enum(
            "graft_trainer_stage", "Stage of the run.", states=list(STAGES), registry=r
        )
        self.step = Gauge("graft_trainer_step", "Optimizer steps done.", registry=r)
        self.total_steps = Gauge("graft_trainer_total_steps", "Steps planned.", registry=r)
        self.epoch = Gauge("graft_trainer_epoch", "Passes over the training data.", registry=r)
        self.eta = Gauge("graft_trainer_eta_seconds", "Estimated time left.", registry=r)
        self.tokens_per_second = Gauge(
            "graft_trainer_tokens_per_second",
            "Training throughput over the last logging window.",
            registry=r,
        )
        self.tokens = Counter(
            "graft_trainer_tokens", "Tokens trained on by this process.", registry=r
        )
        self.loss = Gauge(
            "graft_trainer_loss", "Latest loss: train (logging steps), eval.", ["split"], registry=r
        )
        self.score = Gauge(
            "graft_trainer_eval_score", "Latest evaluation metric.", ["metric"], registry=r
        )
        r.register(_LiveCollector())
        ProcessCollector(registry=r)

    def observe(self, event: ProgressEvent) -> None:
        """One progress event (each carries the whole state)."""
        if event.stage in STAGES:
            self.stage.state(event.stage)
        p, m = event.progress, event.metrics
        self.step.set(p.step)
        for gauge, value in (
            (self.total_steps, p.total_steps),
            (self.epoch, p.epoch),
            (self.eta, p.eta_seconds),
            (self.tokens_per_second, p.tokens_per_second),
        ):
            if value is not None:
                gauge.set(value)
        for split, value in (("train", m.train_loss), ("eval", m.eval_loss)):
            if value is not None:
                self.loss.labels(split).set(value)
        for name in EVAL_SCORES:
            value = getattr(m, name)
            if value is not None:
                self.score.labels(name).set(value)

    def record_step(self, step: int, tokens: int) -> None:
        self.step.set(step)
        if tokens > 0:
            self.tokens.inc(tokens)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class ObservedReporter:
    """A reporter whose events also update the endpoint's series."""

    def __init__(self, inner: Reporter, metrics: TrainerMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    def report(self, event: ProgressEvent) -> None:
        try:
            self.metrics.observe(event)
        except Exception as exc:  # never into the training loop
            log.debug("metrics update dropped: %s", exc)
        self.inner.report(event)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # patch_status and the like, where the inner has it
        return getattr(self.inner, name)


_active: TrainerMetrics | None = None
_server: Any = None
_lock = threading.Lock()


def active() -> TrainerMetrics | None:
    """The series this process serves, if it serves any."""
    return _active


def configured_port(env: Mapping[str, str] | None = None) -> int:
    """The port GRAFT_TRAINER_METRICS_PORT asks for; 0 (off) when unset or unusable."""
    raw = (os.environ if env is None else env).get(PORT_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        log.warning("%s=%r is not a port: no metrics endpoint", PORT_ENV, raw)
        return 0
    return int(raw)


def serve_from_env(env: Mapping[str, str] | None = None) -> TrainerMetrics | None:
    """Start the endpoint when configured (once per process); None when off or unbindable."""
    global _active, _server
    env = os.environ if env is None else env
    with _lock:
        if _active is not None:
            return _active
        port = configured_port(env)
        if not port:
            return None
        host = env.get(HOST_ENV, "").strip() or "0.0.0.0"
        try:
            from prometheus_client import start_http_server

            metrics = TrainerMetrics()
            server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
        except Exception as exc:  # a port another pod holds, no prometheus_client, ...
            log.warning(
                "metrics endpoint not started on %s:%d (%s); training goes on without it",
                host,
                port,
                exc,
            )
            return None
        _active, _server = metrics, server
        log.info("metrics endpoint on %s:%d/metrics", host, port)
        return metrics


def stop() -> None:
    """Close the endpoint (tests; a pod's ends with its process)."""
    global _active, _server
    with _lock:
        if _server is not None:
            with contextlib.suppress(Exception):
                _server.shutdown()
                _server.server_close()
        _active, _server = None, None


def observed(reporter: Reporter) -> Reporter:
    """`reporter`, teed into the endpoint's series when this process serves them."""
    metrics = _active
    return reporter if metrics is None else ObservedReporter(reporter, metrics)


def record_step(step: int, tokens: int) -> None:
    """After every optimizer step (cheap, and nothing when no endpoint is served)."""
    metrics = _active
    if metrics is not None:
        with contextlib.suppress(Exception):
            metrics.record_step(step, tokens)
