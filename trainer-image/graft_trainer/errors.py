"""Errors the trainer turns into exit codes: bad input (2, not worth retrying) or other (1)."""

from __future__ import annotations


class GraftInputError(ValueError):
    """Bad data or spec: a one-line message saying what was expected. Exit code 2."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2
