"""How a trainer names why it failed, in its pod's termination message: `<Reason>: <text>`.

The trainer's exit code says whether a failure is retried (graft.exit_codes); the reason says
which condition reason the resource shows. The operator takes a reason only from the list below
(what the export stages may report) and only with exit code 2; any other text is shown as it is
under `InvalidInput`, so a trainer cannot make a resource claim anything else.
"""

from __future__ import annotations

# Why an OptimizeJob or AdapterBundle export may be refused (the export stages' ExportError).
TRAINER_REASONS = frozenset(
    {
        "InvalidInput",
        "AdapterMismatch",
        "BaseModelMismatch",
        "DeviceUnavailable",
        "ParityExceeded",
        "ParityNotMeasured",
        "SmokeTestFailed",
        "UnsupportedArchitecture",
        "UnsupportedPrecision",
    }
)


def failure_text(reason: str, message: str) -> str:
    """The termination message of a failure with a reason the operator will show (a reason not
    in the list is left out: the operator would not take it)."""
    return f"{reason}: {message}" if reason in TRAINER_REASONS else message


def parse_failure(text: str) -> tuple[str | None, str]:
    """(reason, the rest) when `text` starts with an allowed reason; (None, text) otherwise."""
    head, sep, rest = text.partition(": ")
    if sep and head in TRAINER_REASONS:
        return head, rest
    return None, text
