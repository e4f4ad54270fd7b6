"""Pure: reading conditions, the one way for every object the operator looks at (Graft
resources, Jobs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def find_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    """The condition of that type, whatever its status."""
    for cond in conditions:
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    cond = find_condition(conditions, type_)
    return cond is not None and cond.get("status") == "True"


def true_condition(obj: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    """A copy of `obj`'s condition of that type when its status is True (a Job's Complete,
    a FineTuneJob's Succeeded); None otherwise."""
    cond = find_condition(list((obj.get("status") or {}).get("conditions") or []), type_)
    return dict(cond) if cond is not None and cond.get("status") == "True" else None
