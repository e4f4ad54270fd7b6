"""OptimizeJob: export a (fine-tuned) model to ONNX Runtime GenAI and prove it still works."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from graft.api.base import ApiModel, LocalObjectRef, Location, ModelSource, RunSpec, RunStatus
from graft.api.errors import FieldPathError

Device = Literal["cpu", "cuda"]
Precision = Literal["int4", "int8", "fp16", "bf16", "fp32"]

# What onnxruntime-genai's CPU execution provider runs well; half precisions need a GPU.
PRECISIONS_BY_DEVICE: dict[str, tuple[str, ...]] = {
    "cpu": ("int4", "int8", "fp32"),
    "cuda": ("int4", "int8", "fp16", "bf16", "fp32"),
}


class ExportTarget(ApiModel):
    """The device and precision the exported model is built for."""

    device: Device = Field(default="cpu", description="cpu or cuda.")
    precision: Precision = Field(
        default="int4", description="Weight precision: int4, int8, fp16, bf16 or fp32."
    )

    @model_validator(mode="after")
    def _check_device(self) -> ExportTarget:
        allowed = PRECISIONS_BY_DEVICE[self.device]
        if self.precision not in allowed:
            raise FieldPathError(
                ("precision",),
                f"{self.precision} does not run on {self.device}; choose one of {list(allowed)}",
            )
        return self


class OptimizeSource(ApiModel):
    """What to export: a FineTuneJob's result, or a model with an optional adapter."""

    fine_tune_job_ref: LocalObjectRef | None = Field(
        default=None, description="Use this FineTuneJob's base model and adapter once it Succeeded."
    )
    model: ModelSource | None = Field(default=None, description="A base (or full) model.")
    adapter: Location | None = Field(
        default=None, description="A PEFT adapter for `model`, optional."
    )

    @model_validator(mode="after")
    def _check_one(self) -> OptimizeSource:
        if (self.fine_tune_job_ref is None) == (self.model is None):
            raise FieldPathError((), "set exactly one of fineTuneJobRef or model")
        if self.adapter is not None and self.model is None:
            raise FieldPathError(
                ("adapter",), "adapter goes with model; a fineTuneJobRef brings its own adapter"
            )
        return self


class ParitySpec(ApiModel):
    """How close the ONNX model must stay to the PyTorch model."""

    max_perplexity_increase: float = Field(
        default=0.10,
        ge=0.0,
        le=100.0,
        description="Largest allowed relative perplexity increase on the eval data (0.10 = 10%).",
    )


class ValidateSpec(ApiModel):
    """Checks run on the exported model before the job succeeds."""

    prompts: list[str] = Field(
        default_factory=list, max_length=32, description="Prompts generated from as a smoke test."
    )
    max_new_tokens: int = Field(default=16, ge=1, le=4096, description="Tokens per prompt.")
    parity: ParitySpec | None = Field(
        default=None, description="Perplexity parity against PyTorch on the eval data."
    )


class OptimizeJobSpec(RunSpec):
    """What to export and how to check it."""

    source: OptimizeSource = Field(description="The model (and adapter) to export.")
    adapter_mode: Literal["merge", "separate"] = Field(
        default="merge",
        description="merge folds the adapter into the weights; separate keeps it a runtime adapter.",
    )
    target: ExportTarget = Field(default_factory=ExportTarget, description="Device and precision.")
    validate_: ValidateSpec = Field(
        default_factory=ValidateSpec,
        alias="validate",
        description="Checks before success.",
    )


class OptimizeMetrics(ApiModel):
    """Measurements of the export."""

    size_bytes: int | None = Field(default=None, ge=0, description="Size of the model directory.")
    conversion_seconds: float | None = Field(default=None, ge=0, description="Export time.")
    perplexity_py_torch: float | None = Field(
        default=None, alias="perplexityPyTorch", description="Perplexity of the PyTorch model."
    )
    perplexity_onnx: float | None = Field(default=None, description="Perplexity of the ONNX model.")
    perplexity_increase: float | None = Field(default=None, description="Relative increase.")
    decode_tokens_per_second: float | None = Field(default=None, ge=0, description="Decode speed.")


class Generation(ApiModel):
    """A smoke-test generation."""

    prompt: str = Field(description="The prompt.")
    output: str = Field(description="What the model generated.")


class OptimizeArtifacts(ApiModel):
    """Artifact URIs, each present once its manifest exists."""

    model: str | None = Field(default=None, description="The ONNX Runtime GenAI model directory.")


class OptimizeJobStatus(RunStatus):
    """What the export produced."""

    artifacts: OptimizeArtifacts | None = Field(default=None, description="Where outputs are.")
    metrics: OptimizeMetrics | None = Field(default=None, description="Export measurements.")
    generations: list[Generation] = Field(
        default_factory=list, max_length=32, description="Smoke-test generations."
    )
