"""The Graft API (graft.dev/v1alpha1): the one source of truth for CRDs, operator and trainer."""

from graft.api.base import API_VERSION, GROUP, VERSION
from graft.api.bundle import AdapterBundleSpec, AdapterBundleStatus
from graft.api.errors import FieldIssue, FieldPathError
from graft.api.finetune import FineTuneJobSpec, FineTuneJobStatus
from graft.api.kinds import (
    KINDS,
    KINDS_BY_NAME,
    AdapterBundle,
    FineTuneJob,
    InvalidResource,
    KindInfo,
    OptimizeJob,
    parse_object,
    parse_spec,
)
from graft.api.optimize import OptimizeJobSpec, OptimizeJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "KINDS_BY_NAME",
    "VERSION",
    "AdapterBundle",
    "AdapterBundleSpec",
    "AdapterBundleStatus",
    "FieldIssue",
    "FieldPathError",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "InvalidResource",
    "KindInfo",
    "OptimizeJob",
    "OptimizeJobSpec",
    "OptimizeJobStatus",
    "parse_object",
    "parse_spec",
]
