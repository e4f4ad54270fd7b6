"""Pieces every Graft kind shares: the model base class, locations, resources, conditions.

The pydantic models are the single source of truth for the API. Field descriptions become the
CRD's OpenAPI descriptions (what `kubectl explain` prints) and the generated API reference, so
they are written for users. Defaults are applied by the models, not by the API server, so that
what a user applies is what they read back.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from graft.api.errors import PATTERN_HINTS, FieldPathError

GROUP = "graft.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

LOCATION_SCHEMES = ("s3", "hf", "pvc", "file")
# Defaults that code reading a (possibly older, stored) spec without the field falls back on.
DEFAULT_BACKOFF_LIMIT = 2
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

PATTERN_HINTS[DNS1123_LABEL] = "expected a DNS-1123 label: lowercase letters, digits and '-'"
PATTERN_HINTS[CONDITION_REASON] = "expected a CamelCase reason"


class ApiModel(BaseModel):
    """Base of every API model: camelCase in YAML, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
        use_attribute_docstrings=False,
    )

    def to_api(self) -> dict[str, Any]:
        """The camelCase dict as it appears in YAML, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _quantity(value: int | float | str) -> str:
    # YAML turns `cpu: 4` into an int; Kubernetes quantities are strings either way.
    text = str(value)
    if not re.match(QUANTITY, text):
        raise ValueError(
            f"expected a Kubernetes quantity such as '4', '500m' or '32Gi', got {text!r}"
        )
    return text


Quantity = Annotated[
    int | float | str,
    AfterValidator(_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]

ResourceName = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=DNS1123_LABEL),
]


def check_uri(uri: str, allowed: tuple[str, ...]) -> str:
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in allowed:
        expected = ", ".join(f"{s}://" for s in allowed)
        raise ValueError(f"expected a URI starting with one of {expected}; got {uri!r}")
    if not rest.strip("/"):
        raise ValueError(f"URI {uri!r} names no bucket, repository, claim or path")
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError(f"file:// URIs must be absolute (file:///abs/path); got {uri!r}")
    if scheme == "hf" and rest.count("/") > 1 and not rest.endswith("/"):
        # hf://org/name is a repository; deeper paths are not addressable on the hub.
        raise ValueError(f"hf:// URIs name a repository as hf://org/name; got {uri!r}")
    return uri


class Location(ApiModel):
    """Where a model, dataset or adapter lives."""

    allowed_schemes: ClassVar[tuple[str, ...]] = LOCATION_SCHEMES
    # A scheme this kind of location refuses -> what to use instead (the whole error message).
    refused_schemes: ClassVar[dict[str, str]] = {}

    uri: str = Field(
        max_length=2048,
        description=(
            "s3://bucket/prefix/, hf://org/name, pvc://claim/path, or file:///abs/path "
            "(file:// only for `graft run` on a workstation)."
        ),
    )
    revision: str | None = Field(
        default=None,
        max_length=255,
        description="Branch, tag or commit of an hf:// repository. Only valid with hf:// URIs.",
    )
    credentials_secret: ResourceName | None = Field(
        default=None,
        description=(
            "Name of a Secret in the same namespace holding AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and optionally AWS_ENDPOINT_URL / AWS_REGION (s3://), "
            "or HF_TOKEN (hf://). Secrets are only ever referenced, never copied."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> Location:
        refused = self.refused_schemes.get(self.uri.partition("://")[0])
        if refused is not None and "://" in self.uri:
            raise FieldPathError(("uri",), refused)
        try:
            check_uri(self.uri, self.allowed_schemes)
        except ValueError as exc:
            raise FieldPathError(("uri",), str(exc)) from None
        if self.revision is not None and not self.uri.startswith("hf://"):
            raise FieldPathError(("revision",), "revision is only meaningful for hf:// URIs")
        return self

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]


class ModelSource(Location):
    """A base model: any Hugging Face causal language model."""

    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model repository's own Python code to run. Off by default.",
    )


class OutputLocation(Location):
    """Where a job writes its artifacts."""

    allowed_schemes: ClassVar[tuple[str, ...]] = ("s3", "pvc", "file")
    refused_schemes: ClassVar[dict[str, str]] = {
        "hf": (
            "the output is the job's working store (checkpoints a restarted pod resumes from, "
            "then the finished artifacts) and cannot be a Hub repository: keep it on s3://, "
            "pvc:// or file://, and push the finished adapter to the Hub with "
            "spec.publish: {uri: hf://org/name}"
        )
    }

    uri: str = Field(
        max_length=2048,
        description="s3://bucket/prefix/, pvc://claim/path, or file:///abs/path (graft run only).",
    )


class Resources(ApiModel):
    """Compute the trainer pod asks for."""

    gpu: int = Field(
        default=0,
        ge=0,
        le=16,
        description=(
            "GPUs per pod. 0 runs on CPU. A FineTuneJob with more than one trains data-parallel: "
            "one process per GPU, each on its share of every step's micro-batches (so "
            "perDeviceTrainBatchSize is per GPU and an epoch takes fewer steps)."
        ),
    )
    gpu_resource_name: str = Field(
        default=DEFAULT_GPU_RESOURCE,
        max_length=253,
        pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$",
        description="Extended resource name the GPUs are requested under.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit, e.g. '4'.")
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit, e.g. '32Gi'."
    )
    cache_claim: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description=(
            "PersistentVolumeClaim (in this namespace, ReadWriteMany for pods on several nodes) "
            "that trainer pods use as their download cache of base models, hf:// snapshots and "
            "S3 inputs, shared with every job that names it: a base model is fetched once. "
            "Overrides the platform's trainer.modelCache.claim; an empty string turns it off."
        ),
    )


class Toleration(ApiModel):
    """A Kubernetes toleration, as in a pod spec."""

    key: str | None = Field(default=None, max_length=253, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Exists matches any value; Equal matches `value`."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty tolerates all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated."
    )


class Scheduling(ApiModel):
    """Where the trainer pod may run."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pod's node must carry."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Taints the pod tolerates."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="A Kubernetes Affinity object, passed to the pod unchanged.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the trainer pod."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label on the Job.",
    )


class LocalObjectRef(ApiModel):
    """A reference to another Graft resource in the same namespace."""

    name: ResourceName = Field(description="Name of the referenced resource.")


class RunSpec(ApiModel):
    """Fields every Graft kind has beside its own spec."""

    output: OutputLocation | None = Field(
        default=None,
        description=(
            "Where artifacts go. Defaults to the operator's configured store. Artifacts land "
            "under <uri>/<namespace>/<kind-plural>/<name>-<uid8>/."
        ),
    )
    image: str | None = Field(
        default=None, max_length=512, description="Override of the operator's trainer image."
    )
    resources: Resources = Field(
        default_factory=Resources, description="CPU, memory and GPUs for the pod."
    )
    scheduling: Scheduling = Field(
        default_factory=Scheduling, description="Node selection and queueing for the pod."
    )
    suspend: bool = Field(
        default=False,
        description="true stops (deletes) the running pod and keeps checkpoints; false resumes.",
    )
    backoff_limit: int = Field(
        default=DEFAULT_BACKOFF_LIMIT,
        ge=0,
        le=20,
        description="Pod failures retried. Evictions and preemptions do not count.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Wall-clock limit of one attempt, in seconds."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Delete this resource (never its artifacts) this long after it finishes.",
    )


ConditionType = Literal[
    "Validated", "Running", "Succeeded", "Failed", "Suspended", "Ready", "Degraded"
]
Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]


class Condition(ApiModel):
    """One aspect of the resource's state, in the shape of metav1.Condition."""

    type: ConditionType = Field(description="Which aspect this condition reports.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern=CONDITION_REASON,
        description="A CamelCase word a program can switch on.",
    )
    message: str = Field(default="", max_length=32768, description="What a person should know.")
    last_transition_time: str = Field(
        description="When the status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition was computed for."
    )


class RunStatus(ApiModel):
    """Status fields every Graft kind has."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="The source of truth for the resource's state.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    phase: Phase | None = Field(
        default=None, description="A one-word summary derived from the conditions."
    )
    start_time: str | None = Field(
        default=None,
        description="When the first attempt started (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    completion_time: str | None = Field(
        default=None,
        description="When the resource succeeded or failed for good (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    attempts: int | None = Field(default=None, ge=0, description="Pods started so far.")
    job_name: str | None = Field(default=None, description="The batch/v1 Job running the work.")


class ObjectMeta(ApiModel):
    """The parts of Kubernetes object metadata that Graft reads. Other fields pass through."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        max_length=52,
        pattern=DNS1123_LABEL,
        description=(
            "Resource name: a DNS-1123 label of at most 52 characters, so that the names of "
            "the Jobs derived from it stay within Kubernetes' 63-character label limit."
        ),
    )
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS1123_LABEL)
