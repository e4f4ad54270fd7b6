"""Errors the trainer turns into exit codes (graft.exit_codes): bad input (2) and untrusted
storage (3) are not worth retrying; anything else (1) is."""

from __future__ import annotations

from graft.exit_codes import EXIT_FAILURE, EXIT_INVALID_INPUT, EXIT_OK, EXIT_UNTRUSTED_STORAGE

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_UNTRUSTED_STORAGE",
    "GraftInputError",
    "one_line",
    "store_exit_code",
]


class GraftInputError(ValueError):
    """Bad data or spec: a one-line message saying what was expected. Exit code 2."""


EXIT_INVALID = EXIT_INVALID_INPUT


def store_exit_code(exc: Exception) -> int:
    """A store fault is transient (1, retried) unless a retry must end the same way: what is
    stored cannot be trusted (3: a file differs from its manifest, a key escapes its folder), or
    the store refused us (2: no such bucket, wrong credentials, not allowed to write)."""
    from graft.storage import IntegrityError, StoreAccessError

    if isinstance(exc, IntegrityError):
        return EXIT_UNTRUSTED_STORAGE
    if isinstance(exc, StoreAccessError):
        return EXIT_INVALID_INPUT
    return EXIT_FAILURE


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
