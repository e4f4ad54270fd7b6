"""The one exception the export stages raise for input they refuse or checks that fail."""

from __future__ import annotations

from typing import Any

from graft_trainer.errors import GraftInputError


class ExportError(GraftInputError):
    """Bad input or a failed check, with the field of the resource it concerns.

    `field` is a dotted path into the resource (``spec.target.precision``,
    ``spec.adapters[1]``); `reason` is a CamelCase condition reason for the caller's status.
    `details` carries what was measured before the failure (metrics, per-adapter reports), so
    the caller can still record it. A subclass of the trainer's `GraftInputError`: retrying the
    same input gives the same answer (exit code 2).
    """

    def __init__(
        self,
        field: str,
        message: str,
        reason: str = "InvalidInput",
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.reason = reason
        self.details = details or {}
