"""Deterministic names and locations derived from a resource: the same input, the same answer.

Both the operator (to name children and predict artifact URIs) and the trainer (to write
them) call these, so the two can never disagree.
"""

from __future__ import annotations

import hashlib

from graft.api.kinds import KINDS_BY_NAME

MAX_NAME = 63


def artifact_prefix(output_uri: str, namespace: str, kind: str, name: str, uid: str) -> str:
    """`<output>/<namespace>/<kind-plural>/<name>-<uid8>/`: unique per resource incarnation."""
    plural = KINDS_BY_NAME[kind].plural
    return f"{output_uri.rstrip('/')}/{namespace}/{plural}/{name}-{uid.replace('-', '')[:8]}/"


def child_name(parent: str, suffix: str) -> str:
    """A child object's name, `<parent>-<suffix>`, shortened with a hash if too long."""
    name = f"{parent}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"
