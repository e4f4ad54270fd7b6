"""TensorBoard event files: live while training, complete at the end.

The live writer adds each logged and evaluated step as it happens and uploads its event file to
`<prefix>tensorboard/live/` with every checkpoint, after every evaluation and at least once a
minute, so `tensorboard --logdir <prefix>tensorboard/` (or a copy of it) shows a run in progress.
Each attempt writes its own event file there (a resumed pod adds only the steps after its
checkpoint). The finished run also writes one complete file from the whole history into its
output (`<prefix>tensorboard/`, under the output's manifest)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graft.storage.uri import join_uri

log = logging.getLogger("graft_trainer.tensorboard")

LIVE_FOLDER = "tensorboard/live/"


def scalars(entry: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) of one history entry: train/<name> for training, eval/<name> as logged."""
    for key, value in entry.items():
        if (
            key in ("step", "epoch")
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            continue
        yield (key if key.startswith("eval/") else f"train/{key}"), float(value)


def write_tensorboard(directory: Path, history: list[dict[str, Any]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    try:
        for entry in history:
            for tag, value in scalars(entry):
                writer.add_scalar(tag, value, int(entry["step"]))
    finally:
        writer.close()


class LiveTensorBoard:
    """One attempt's event file, uploaded as training goes. A failed upload is logged, never
    raised: a chart is not worth a training step (the checkpoint's own upload is)."""

    def __init__(
        self, local_dir: Path, prefix: str, store: Any, min_interval: float = 60.0
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.local_dir = local_dir
        self.uri = join_uri(prefix, LIVE_FOLDER)
        self.store = store
        self.min_interval = min_interval
        self._writer = SummaryWriter(log_dir=str(local_dir))
        self._last_upload = time.monotonic()
        self._pending = False

    def add(self, entry: dict[str, Any]) -> None:
        for tag, value in scalars(entry):
            self._writer.add_scalar(tag, value, int(entry["step"]))
        self._pending = True

    def publish(self, force: bool = False) -> None:
        """Upload the event file when something new was added and it is due (or `force`)."""
        due = time.monotonic() - self._last_upload >= self.min_interval
        if not self._pending or not (force or due):
            return
        self._writer.flush()
        try:
            for path in sorted(self.local_dir.glob("events.out.tfevents.*")):
                self.store.upload_file(path, join_uri(self.uri, path.name))
        except Exception as exc:  # the store's own retries are spent: go on training
            log.warning("live TensorBoard upload to %s failed: %s", self.uri, exc)
            return
        self._pending = False
        self._last_upload = time.monotonic()

    def close(self) -> None:
        self.publish(force=True)
        self._writer.close()
