"""Validation errors that name the field path a user must fix.

pydantic reports the location of a failing field, but a cross-field rule checked in a model
validator is reported at the model's own location. Such rules raise `FieldPathError` with the
path below the model, and `field_issues` joins the two into one path such as
`spec.quantization.bits`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

# Regular expressions of the API, said in words: "should match pattern '^[a-z0-9]...'" helps
# nobody. Modules that define a pattern register its wording here.
PATTERN_HINTS: dict[str, str] = {}


class FieldPathError(ValueError):
    """A rule broken at `path`, relative to the model whose validator raised it."""

    def __init__(self, path: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.path = tuple(path)
        self.message = message


@dataclass(frozen=True)
class FieldIssue:
    """One problem in a resource: where it is and what was expected."""

    path: tuple[str | int, ...]
    message: str

    @property
    def dotted(self) -> str:
        return format_path(self.path)

    def __str__(self) -> str:
        return f"{self.dotted}: {self.message}" if self.path else self.message


def format_path(path: Iterable[str | int]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _plain_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    # Union members and tagged choices add their type name to the location; users never
    # wrote those, so they are dropped (they hold brackets, parentheses or commas, which no
    # field name has). Map keys stay, dashes and all: `namespaces.team-a.maxGpus`.
    return tuple(p for p in loc if isinstance(p, int) or not any(c in p for c in "[](),"))


def field_issues(
    exc: ValidationError,
    prefix: Sequence[str | int] = (),
    known_fields: Iterable[str] = (),
) -> list[FieldIssue]:
    """Turn a pydantic error into issues with full field paths and plain messages."""
    known = sorted(set(known_fields))
    issues: list[FieldIssue] = []
    for err in exc.errors(include_url=False):
        loc = tuple(prefix) + _plain_loc(tuple(err["loc"]))
        message = err["msg"]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldPathError):
            loc += cause.path
            message = cause.message
        elif err["type"] == "value_error" and message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
            name = loc[-1] if loc else ""
            if isinstance(name, str):
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
                if close:
                    message += f"; did you mean {close[0]!r}?"
        elif err["type"] == "string_pattern_mismatch":
            pattern = (err.get("ctx") or {}).get("pattern", "")
            hint = PATTERN_HINTS.get(pattern)
            if hint:
                message = f"{hint}; got {err['input']!r}"
        elif err["type"] == "missing":
            message = "required field is missing"
        issue = FieldIssue(loc, message)
        if issue not in issues:
            issues.append(issue)
    return issues
