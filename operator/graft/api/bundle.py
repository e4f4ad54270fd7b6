"""AdapterBundle: one exported base model serving many LoRA adapters, chosen per request."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from graft.api.base import (
    LOCATION_SCHEMES,
    ApiModel,
    LocalObjectRef,
    Location,
    ModelSource,
    ResourceName,
    RunSpec,
    RunStatus,
    check_uri,
)
from graft.api.errors import PATTERN_HINTS, FieldPathError
from graft.api.optimize import ExportTarget, Generation

ADAPTER_NAME = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$"
PATTERN_HINTS[ADAPTER_NAME] = "expected lowercase letters, digits, '-' and '_'"


class BundleAdapter(ApiModel):
    """One adapter of the bundle: from a FineTuneJob, or from a location."""

    name: str = Field(
        max_length=63,
        pattern=ADAPTER_NAME,
        description="The name a client activates the adapter by.",
    )
    fine_tune_job_ref: LocalObjectRef | None = Field(
        default=None, description="Take the adapter of this FineTuneJob once it Succeeded."
    )
    uri: str | None = Field(
        default=None,
        max_length=2048,
        description="A PEFT adapter directory: s3://, hf://, pvc:// or file:// (graft run only).",
    )
    credentials_secret: ResourceName | None = Field(
        default=None, description="Secret with the credentials for `uri`, as for any location."
    )

    @model_validator(mode="after")
    def _check_one(self) -> BundleAdapter:
        if (self.fine_tune_job_ref is None) == (self.uri is None):
            raise FieldPathError((), "set exactly one of fineTuneJobRef or uri")
        if self.uri is not None:
            try:
                check_uri(self.uri, LOCATION_SCHEMES)
            except ValueError as exc:
                raise FieldPathError(("uri",), str(exc)) from None
        elif self.credentials_secret is not None:
            raise FieldPathError(("credentialsSecret",), "credentialsSecret goes with uri")
        return self

    def location(self) -> Location | None:
        if self.uri is None:
            return None
        return Location(uri=self.uri, credentials_secret=self.credentials_secret)


class BundleValidateSpec(ApiModel):
    """The smoke test each adapter goes through."""

    prompts: list[str] = Field(
        default_factory=list, max_length=32, description="Prompts generated with each adapter."
    )
    max_new_tokens: int = Field(default=16, ge=1, le=4096, description="Tokens per prompt.")


class AdapterBundleSpec(RunSpec):
    """The base model, the adapters, and the export target."""

    base_model: ModelSource | None = Field(
        default=None,
        description="The base model. Optional when every adapter comes from a FineTuneJob "
        "(their base models must then agree).",
    )
    adapters: list[BundleAdapter] = Field(
        min_length=1, max_length=64, description="The adapters, by name."
    )
    target: ExportTarget = Field(default_factory=ExportTarget, description="Device and precision.")
    validate_: BundleValidateSpec = Field(
        default_factory=BundleValidateSpec, alias="validate", description="Per-adapter smoke test."
    )

    @model_validator(mode="after")
    def _check_adapters(self) -> AdapterBundleSpec:
        seen: dict[str, int] = {}
        for index, adapter in enumerate(self.adapters):
            if adapter.name in seen:
                raise FieldPathError(
                    ("adapters", index, "name"),
                    f"adapter name {adapter.name!r} is already used by adapters[{seen[adapter.name]}]",
                )
            seen[adapter.name] = index
            if adapter.uri is not None and self.base_model is None:
                raise FieldPathError(
                    ("baseModel",), f"adapters[{index}] is given by uri, so baseModel is required"
                )
        return self


class AdapterReport(ApiModel):
    """What the compatibility contract found for one adapter."""

    name: str = Field(description="Adapter name.")
    rank: int | None = Field(default=None, ge=0, description="LoRA rank.")
    target_modules: list[str] = Field(default_factory=list, description="Adapted modules.")
    sha256: str | None = Field(default=None, description="Digest of the .onnx_adapter file.")
    smoke_test: Literal["passed", "failed", "pending"] = Field(
        default="pending", description="Result of the onnxruntime-genai smoke test."
    )
    decode_overhead: float | None = Field(
        default=None, description="Decode slowdown against the base alone (0.04 = 4%)."
    )
    generations: list[Generation] = Field(
        default_factory=list, max_length=32, description="Smoke-test generations."
    )


class BundleArtifacts(ApiModel):
    """Artifact URIs, present once the bundle manifest exists."""

    model: str | None = Field(default=None, description="The exported base model directory.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapter name to its .onnx_adapter file."
    )


class AdapterBundleStatus(RunStatus):
    """The bundle's contract results."""

    artifacts: BundleArtifacts | None = Field(default=None, description="Where outputs are.")
    adapters: list[AdapterReport] = Field(
        default_factory=list, description="Per-adapter contract results."
    )
