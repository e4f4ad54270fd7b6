"""Errors the trainer turns into exit codes: bad input (2, not worth retrying) or other (1)."""

from __future__ import annotations


class GraftInputError(ValueError):
    """Bad data or spec: a one-line message saying what was expected. Exit code 2."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2


def store_exit_code(exc: Exception) -> int:
    """A store fault is transient (1, retried) unless what is stored cannot be trusted: a file
    that differs from its manifest, or a key that escapes its folder (2: a retry reads the same)."""
    from graft.storage import IntegrityError

    return EXIT_INVALID if isinstance(exc, IntegrityError) else EXIT_FAILURE
