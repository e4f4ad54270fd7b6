"""Secret values never leave the pod in a message.

The trainer's credentials arrive as environment variables, by `envFrom`/`secretKeyRef` from
Secrets whose key names Graft does not choose. So every variable's value counts as secret except
those of names known to hold configuration (set by the operator, the platform's images or the
kubelet). What the trainer hands the operator (its termination message, the status it reports)
passes through `redact` first; the pod spec takes its termination message from that file only,
never from the log tail, so nothing unredacted is copied by the kubelet either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

REDACTED = "[redacted]"
# Shorter values ("1", "true", a region) are neither secret nor safe to replace everywhere.
MIN_SECRET_LENGTH = 8
_CONFIGURATION = re.compile(
    r"^(?!GRAFT_SECRET_)(GRAFT_\w+|HOME|PATH|PWD|OLDPWD|HOSTNAME|SHELL|USER|LOGNAME|TERM|SHLVL|TZ"
    r"|LANG|LC_\w+|PYTHON\w*|VIRTUAL_ENV|KUBERNETES_\w+|HF_HUB_\w+|HF_HOME|HF_ENDPOINT"
    r"|TRANSFORMERS_\w+|TOKENIZERS_PARALLELISM|AWS_ENDPOINT_URL\w*|AWS_REGION|AWS_DEFAULT_REGION"
    r"|CUDA_\w+|NVIDIA_\w+|NCCL_\w+|OMP_\w+|MKL_\w+|OPENBLAS_\w+|ATEN_\w+|ONEDNN_\w+|TMPDIR"
    r"|PIP_\w+|UV_\w+|LD_LIBRARY_PATH|MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK)$"
)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values to hide, longest first (so a secret containing another is hidden whole)."""
    env = os.environ if env is None else env
    values = {
        value
        for name, value in env.items()
        if not _CONFIGURATION.match(name) and len(value) >= MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value replaced by [redacted]."""
    redacted = redact_strings(text, env)
    assert isinstance(redacted, str)
    return redacted


def redact_strings(value: object, env: Mapping[str, str] | None = None) -> object:
    """A JSON-like value with `redact` applied to every string in it (keys included)."""
    secrets = secret_values(env)
    if not secrets:
        return value

    def walk(item: object) -> object:
        if isinstance(item, str):
            for secret in secrets:
                item = item.replace(secret, REDACTED)
            return item
        if isinstance(item, dict):
            return {walk(k): walk(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [walk(v) for v in item]
        return item

    return walk(value)
