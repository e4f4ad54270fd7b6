"""The three Graft kinds as whole objects, and what the CRDs need to know about each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationError

from graft.api.base import API_VERSION, GROUP, VERSION, ApiModel, ObjectMeta, RunSpec, RunStatus
from graft.api.bundle import AdapterBundleSpec, AdapterBundleStatus
from graft.api.errors import FieldIssue, field_issues
from graft.api.finetune import FineTuneJobSpec, FineTuneJobStatus
from graft.api.optimize import OptimizeJobSpec, OptimizeJobStatus


class GraftObject(ApiModel):
    """Fields every Graft object has at the top level."""

    api_version: Literal["graft.dev/v1alpha1"] = Field(description="graft.dev/v1alpha1.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")


class FineTuneJob(GraftObject):
    """Fine-tunes a causal language model (LoRA, QLoRA, DoRA or full) and stores the result."""

    kind: Literal["FineTuneJob"] = Field(description="FineTuneJob.")
    spec: FineTuneJobSpec = Field(description="What to fine-tune, on which data, and how.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state.")


class OptimizeJob(GraftObject):
    """Exports a model (and adapter) to ONNX Runtime GenAI and validates the result."""

    kind: Literal["OptimizeJob"] = Field(description="OptimizeJob.")
    spec: OptimizeJobSpec = Field(description="What to export and how to check it.")
    status: OptimizeJobStatus | None = Field(default=None, description="Observed state.")


class AdapterBundle(GraftObject):
    """One exported base model serving several LoRA adapters, each checked against the graph."""

    kind: Literal["AdapterBundle"] = Field(description="AdapterBundle.")
    spec: AdapterBundleSpec = Field(description="Base model, adapters and export target.")
    status: AdapterBundleStatus | None = Field(default=None, description="Observed state.")


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str
    json_path: str
    description: str
    priority: int = 0

    def to_crd(self) -> dict[str, Any]:
        column: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "jsonPath": self.json_path,
            "description": self.description,
        }
        if self.priority:
            column["priority"] = self.priority
        return column


@dataclass(frozen=True)
class KindInfo:
    """A kind's names and the model classes behind it."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    model: type[GraftObject]
    spec: type[RunSpec]
    status: type[RunStatus]
    columns: tuple[PrinterColumn, ...] = field(default=())

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


_PHASE = PrinterColumn("Phase", "string", ".status.phase", "Summary of the conditions.")
_AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation.")
_REASON = PrinterColumn(
    "Reason", "string", '.status.conditions[?(@.type=="Failed")].reason', "Why it failed.", 1
)

KINDS: tuple[KindInfo, ...] = (
    KindInfo(
        "FineTuneJob",
        "finetunejobs",
        ("ftj",),
        FineTuneJob,
        FineTuneJobSpec,
        FineTuneJobStatus,
        (
            _PHASE,
            PrinterColumn(
                "Progress", "integer", ".status.progress.percent", "Percent of steps done."
            ),
            PrinterColumn("Eval-Loss", "number", ".status.metrics.evalLoss", "Latest eval loss."),
            PrinterColumn("Method", "string", ".spec.method", "Fine-tuning method.", 1),
            _REASON,
            _AGE,
        ),
    ),
    KindInfo(
        "OptimizeJob",
        "optimizejobs",
        ("optj",),
        OptimizeJob,
        OptimizeJobSpec,
        OptimizeJobStatus,
        (
            _PHASE,
            PrinterColumn("Precision", "string", ".spec.target.precision", "Export precision."),
            PrinterColumn("Size", "integer", ".status.metrics.sizeBytes", "Model size in bytes."),
            _REASON,
            _AGE,
        ),
    ),
    KindInfo(
        "AdapterBundle",
        "adapterbundles",
        ("ab",),
        AdapterBundle,
        AdapterBundleSpec,
        AdapterBundleStatus,
        (
            PrinterColumn(
                "Ready",
                "string",
                '.status.conditions[?(@.type=="Ready")].status',
                "Contract passed.",
            ),
            _PHASE,
            _REASON,
            _AGE,
        ),
    ),
)

KINDS_BY_NAME = {info.kind: info for info in KINDS}

AnyGraftObject = FineTuneJob | OptimizeJob | AdapterBundle


class InvalidResource(ValueError):
    """A document that is not a valid Graft object; `issues` name each field."""

    def __init__(self, issues: list[FieldIssue]) -> None:
        super().__init__("; ".join(str(i) for i in issues))
        self.issues = issues


def known_field_names() -> set[str]:
    """Every camelCase field name in the API, for did-you-mean hints."""
    names: set[str] = set()
    seen: set[type] = set()

    def visit(model: type[ApiModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
            for arg in annotation_types(info.annotation):
                if isinstance(arg, type) and issubclass(arg, ApiModel):
                    visit(arg)

    for info in KINDS:
        visit(info.model)
    return names


def annotation_types(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    found: list[Any] = []
    for arg in args:
        found.extend(annotation_types(arg))
    return found


def parse_object(document: Any) -> AnyGraftObject:
    """Validate one YAML/JSON document as a Graft object, or raise InvalidResource."""
    if not isinstance(document, dict):
        raise InvalidResource(
            [FieldIssue((), "expected a mapping with apiVersion, kind, metadata, spec")]
        )
    kind = document.get("kind")
    info = KINDS_BY_NAME.get(kind) if isinstance(kind, str) else None
    if info is None:
        kinds = ", ".join(KINDS_BY_NAME)
        raise InvalidResource([FieldIssue(("kind",), f"expected one of {kinds}; got {kind!r}")])
    api_version = document.get("apiVersion")
    if api_version != API_VERSION:
        raise InvalidResource(
            [FieldIssue(("apiVersion",), f"expected {API_VERSION}; got {api_version!r}")]
        )
    try:
        obj = info.model.model_validate(document)
    except ValidationError as exc:
        raise InvalidResource(field_issues(exc, known_fields=known_field_names())) from None
    assert isinstance(obj, FineTuneJob | OptimizeJob | AdapterBundle)
    return obj


def parse_spec(kind: str, spec: Any) -> RunSpec:
    """Validate a spec alone (what the operator sees in a handler), or raise InvalidResource."""
    info = KINDS_BY_NAME[kind]
    try:
        return info.spec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidResource(
            field_issues(exc, prefix=("spec",), known_fields=known_field_names())
        ) from None


__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "AdapterBundle",
    "FineTuneJob",
    "InvalidResource",
    "OptimizeJob",
    "parse_object",
    "parse_spec",
]
