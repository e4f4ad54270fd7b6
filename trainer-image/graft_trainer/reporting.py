"""Reporters of progress events: rich (a terminal display), jsonl (structured lines on stdout:
in a pod, what the operator reads from the pod's log to show progress in status; see
graft.contract), and a list for tests."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from graft.contract import PROGRESS_EVENT
from graft.progress import ProgressEvent, Reporter


def event_dict(event: ProgressEvent) -> dict[str, Any]:
    """The event as camelCase JSON, without unset fields."""
    return {
        "stage": event.stage,
        "progress": event.progress.to_api(),
        "metrics": event.metrics.to_api(),
        "warnings": [w.to_api() for w in event.warnings],
        "message": event.message,
        "artifacts": dict(event.artifacts),
    }


class NullReporter:
    def report(self, event: ProgressEvent) -> None:
        pass

    def close(self) -> None:
        pass


class ListReporter:
    """Keeps every event (tests)."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def report(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class JsonlReporter:
    """One JSON object per event on a stream (stdout by default), secret values redacted: in a
    pod the operator copies the newest into the resource's status."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def report(self, event: ProgressEvent) -> None:
        from graft_trainer.redaction import redact_strings

        try:
            ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            record: dict[str, Any] = {"ts": ts, "event": PROGRESS_EVENT}
            record.update(event_dict(event))
            line = json.dumps(redact_strings(record), default=str, separators=(",", ":"))
            self.stream.write(line + "\n")
            self.stream.flush()
        except Exception:  # a reporter never breaks training
            pass

    def close(self) -> None:
        pass


class RichReporter:
    """A progress bar with loss, eval metrics, tokens/s and memory, for `graft run`."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.task: Any = None
        self.seen_warnings: set[str] = set()
        self.started = False

    def report(self, event: ProgressEvent) -> None:
        try:
            if not self.started:
                self.progress.start()
                self.started = True
            p, m = event.progress, event.metrics
            parts = []
            if m.train_loss is not None:
                parts.append(f"loss {m.train_loss:.4f}")
            if m.eval_loss is not None:
                parts.append(f"eval {m.eval_loss:.4f}")
            if m.accuracy is not None:
                parts.append(f"acc {m.accuracy:.3f}")
            if p.tokens_per_second:
                parts.append(f"{p.tokens_per_second:,.0f} tok/s")
            if m.peak_memory_bytes:
                parts.append(f"{m.peak_memory_bytes / 2**20:,.0f} MiB")
            info = "  ".join(parts)
            if self.task is None:
                self.task = self.progress.add_task(
                    "train", total=p.total_steps or None, stage=event.stage, info=info
                )
            self.progress.update(
                self.task,
                completed=p.step,
                total=p.total_steps or None,
                stage=event.stage,
                info=info,
            )
            for w in event.warnings:
                if w.message not in self.seen_warnings:
                    self.seen_warnings.add(w.message)
                    self.progress.console.print(f"[yellow]warning[/] {w.type}: {w.message}")
            if event.message and event.stage in (
                "preflight",
                "loading",
                "baseline",
                "exporting",
                "done",
            ):
                self.progress.console.print(f"[dim]{event.stage}[/] {event.message}")
        except Exception:
            pass

    def close(self) -> None:
        if self.started:
            self.progress.stop()


def make_reporter(name: str | None) -> Reporter:
    """`rich`, `jsonl` or `none`; `kubernetes` (what pods of earlier operators were given) is
    `jsonl`: the operator reads progress from the pod's log."""
    name = (name or "jsonl").lower()
    if name == "rich":
        return RichReporter()
    if name in ("jsonl", "kubernetes"):
        return JsonlReporter()
    if name in ("none", "null"):
        return NullReporter()
    raise ValueError(f"unknown reporter {name!r}: expected rich, jsonl or none")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            body.update(extra)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


class _OfflineKernelHint(logging.Filter):
    """Drops bitsandbytes' hint to `pip install kernels` on CPUs with AVX512-BF16: that package
    downloads its kernel from the Hugging Face Hub at run time, which a trainer pod must not
    depend on, so the hint would only alarm every log (bitsandbytes falls back by itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


_OFFLINE_KERNEL_HINT = _OfflineKernelHint()


def setup_logging(json_lines: bool = False, level: int = logging.INFO) -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OFFLINE_KERNEL_HINT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("graft_trainer")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
