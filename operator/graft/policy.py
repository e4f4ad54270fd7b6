"""Platform policy: what the platform lets tenants run, checked before anything is created.

The platform team sets it in the chart's `policy` values (the operator reads it from
GRAFT_POLICY as JSON); `graft validate --policy FILE` applies the same rules offline. A broken
rule is a `PolicyIssue` naming the spec field and the rule: the resource shows reason
`PolicyDenied` and nothing is launched. A policy changed later applies to resources launched
after it; running ones keep their launched spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from graft.api.base import Toleration
from graft.api.errors import FieldIssue, field_issues


@dataclass(frozen=True)
class PolicyIssue(FieldIssue):
    """A spec field that a platform rule refuses; `rule` names the policy key."""

    rule: str = ""

    def __str__(self) -> str:
        return f"{super().__str__()} (policy {self.rule})"


class PolicyModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class TrainerServiceAccount(PolicyModel):
    """The identity trainer pods of one namespace run as."""

    name: str = Field(
        default="",
        pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description=(
            "ServiceAccount name (the operator creates it if missing). Empty: the operator's "
            "default (graft-trainer). A cloud role can trust it by this predictable name."
        ),
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Annotations set when the operator creates the ServiceAccount, e.g. "
            "eks.amazonaws.com/role-arn (IRSA) or iam.gke.io/gcp-service-account (Workload "
            "Identity): the tenant's own cloud role. An existing ServiceAccount is not changed."
        ),
    )


class DefaultOutput(PolicyModel):
    """Where a namespace's resources without spec.output write."""

    uri: str = Field(description="Artifact store URI, e.g. s3://graft/team-a/.")
    credentials_secret: str = Field(
        default="",
        description="Secret in the namespace with the store's credentials (named, never read).",
    )


class NamespacePolicy(PolicyModel):
    """Rules for one namespace (a tenant)."""

    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Node labels forced on this namespace's trainer pods (over the spec's own, key by "
            "key): the tenant's node pool."
        ),
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Tolerations added to this namespace's trainer pods (for its node pool's taints).",
    )
    default_node_selector: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Node labels given to trainer pods whose spec does not set that label itself "
            "(a default the tenant may override, unlike nodeSelector)."
        ),
    )
    default_tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Tolerations given to trainer pods whose spec sets no tolerations.",
    )
    max_gpus: int | None = Field(
        default=None,
        ge=0,
        description=(
            "GPUs this namespace's running Jobs may hold at once (overrides maxGpusPerNamespace); "
            "a launch that would go over waits. Empty: the platform-wide value."
        ),
    )
    trainer_service_account: TrainerServiceAccount = Field(
        default_factory=TrainerServiceAccount,
        description="The ServiceAccount this namespace's trainer pods run as.",
    )
    output: DefaultOutput | None = Field(
        default=None,
        description=(
            "Artifact store (and credentials Secret) for this namespace's resources that set no "
            "spec.output; over the operator-wide default."
        ),
    )
    output_prefixes: list[str] = Field(
        default_factory=list,
        description=(
            "Artifact URIs this namespace may write under (e.g. s3://graft/team-a/); a "
            "spec.output.uri outside them is denied. Empty: any."
        ),
    )


class PlatformPolicy(PolicyModel):
    """What tenants may run. Every rule is off by default (an empty policy allows all)."""

    allowed_images: list[str] = Field(
        default_factory=list,
        description=(
            "Prefixes a spec.image must start with (a registry, a repository, or a whole "
            "image@sha256:digest). Empty: any image."
        ),
    )
    allow_trust_remote_code: bool = Field(
        default=True,
        description="Whether trustRemoteCode (code shipped with a model) may be set.",
    )
    max_gpus_per_job: int | None = Field(
        default=None, ge=0, description="The most GPUs one resource may ask for. Empty: no cap."
    )
    max_gpus_per_namespace: int | None = Field(
        default=None,
        ge=0,
        description=(
            "GPUs the running Jobs of one namespace may hold at once; a launch that would go "
            "over waits (reason WaitingForGpuBudget) until GPUs are released. Empty: no cap."
        ),
    )
    allowed_priority_classes: list[str] | None = Field(
        default=None,
        description=(
            "PriorityClasses spec.scheduling.priorityClassName may name. Empty list: none; "
            "unset: any."
        ),
    )
    default_active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Wall-clock limit of one attempt for resources that set no "
            "spec.activeDeadlineSeconds. Empty: none."
        ),
    )
    namespaces: dict[str, NamespacePolicy] = Field(
        default_factory=dict, description="Rules per namespace, by namespace name."
    )


def parse_policy(data: Any) -> PlatformPolicy:
    """A policy from parsed JSON/YAML; ValueError naming each wrong field."""
    if data in (None, ""):
        return PlatformPolicy()
    try:
        return PlatformPolicy.model_validate(data)
    except ValidationError as exc:
        known = [f.alias or n for n, f in PlatformPolicy.model_fields.items()]
        raise ValueError("; ".join(str(i) for i in field_issues(exc, (), known))) from None


def policy_from_json(text: str, where: str = "GRAFT_POLICY") -> PlatformPolicy:
    try:
        return parse_policy(json.loads(text) if text.strip() else None)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not JSON: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _trusted_code_paths(node: Any, path: tuple[str | int, ...]) -> list[tuple[str | int, ...]]:
    """Paths of every `trustRemoteCode: true` in a spec (model, baseModel, ...)."""
    found: list[tuple[str | int, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "trustRemoteCode" and value is True:
                found.append((*path, key))
            else:
                found += _trusted_code_paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _trusted_code_paths(value, (*path, i))
    return found


def policy_issues(
    spec: dict[str, Any], namespace: str | None, policy: PlatformPolicy
) -> list[PolicyIssue]:
    """What `policy` refuses in a resolved spec (API field names), each with its field path."""
    issues: list[PolicyIssue] = []
    image = spec.get("image")
    if image and policy.allowed_images and not image.startswith(tuple(policy.allowed_images)):
        issues.append(
            PolicyIssue(
                ("spec", "image"),
                f"{image!r} is not an allowed image; allowed prefixes: "
                f"{', '.join(policy.allowed_images)}",
                "allowedImages",
            )
        )
    if not policy.allow_trust_remote_code:
        for path in _trusted_code_paths(spec, ("spec",)):
            issues.append(
                PolicyIssue(
                    path,
                    "running code shipped with a model is not allowed on this platform",
                    "allowTrustRemoteCode",
                )
            )
    gpu = int((spec.get("resources") or {}).get("gpu") or 0)
    if policy.max_gpus_per_job is not None and gpu > policy.max_gpus_per_job:
        issues.append(
            PolicyIssue(
                ("spec", "resources", "gpu"),
                f"{gpu} GPUs asked, at most {policy.max_gpus_per_job} per job allowed",
                "maxGpusPerJob",
            )
        )
    budget = gpu_budget(policy, namespace or "")
    if budget is not None and gpu > budget:
        issues.append(
            PolicyIssue(
                ("spec", "resources", "gpu"),
                f"{gpu} GPUs asked, more than namespace {namespace} may ever hold ({budget})",
                _budget_rule(policy, namespace or ""),
            )
        )
    priority = (spec.get("scheduling") or {}).get("priorityClassName")
    allowed = policy.allowed_priority_classes
    if priority and allowed is not None and priority not in allowed:
        issues.append(
            PolicyIssue(
                ("spec", "scheduling", "priorityClassName"),
                f"{priority!r} is not allowed; allowed: {', '.join(allowed) or 'none'}",
                "allowedPriorityClasses",
            )
        )
    rules = policy.namespaces.get(namespace or "")
    output = str((spec.get("output") or {}).get("uri") or "")
    # No output yet (a file checked offline): the operator's or the namespace's default comes
    # in at launch, and is judged then.
    if (
        output
        and rules
        and rules.output_prefixes
        and not output.startswith(tuple(rules.output_prefixes))
    ):
        issues.append(
            PolicyIssue(
                ("spec", "output", "uri"),
                f"{output!r} is outside what namespace {namespace} may write: "
                f"{', '.join(rules.output_prefixes)}",
                f"namespaces.{namespace}.outputPrefixes",
            )
        )
    return issues


def place_trainer_pod(
    pod_spec: dict[str, Any],
    namespace: str,
    policy: PlatformPolicy,
    spec_tolerations: bool = False,
) -> None:
    """Default, then force, the namespace's node selector and tolerations onto a trainer pod
    spec (`spec_tolerations`: the resource's spec sets its own, so the default ones stay out).
    Applied when a Job is built, so a changed policy reaches new Jobs only."""
    rules = policy.namespaces.get(namespace)
    if rules is None:
        return
    if rules.default_node_selector:
        pod_spec["nodeSelector"] = {
            **rules.default_node_selector,
            **pod_spec.get("nodeSelector", {}),
        }
    if rules.default_tolerations and not spec_tolerations:
        defaults = [t.to_api() for t in rules.default_tolerations]
        pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *defaults]
    if rules.node_selector:
        pod_spec["nodeSelector"] = {**pod_spec.get("nodeSelector", {}), **rules.node_selector}
    if rules.tolerations:
        forced = [t.to_api() for t in rules.tolerations]
        pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *forced]


def gpu_budget(policy: PlatformPolicy, namespace: str) -> int | None:
    """GPUs the namespace's running Jobs may hold at once; None: no cap."""
    rules = policy.namespaces.get(namespace)
    if rules is not None and rules.max_gpus is not None:
        return rules.max_gpus
    return policy.max_gpus_per_namespace


def _budget_rule(policy: PlatformPolicy, namespace: str) -> str:
    rules = policy.namespaces.get(namespace)
    if rules is not None and rules.max_gpus is not None:
        return f"namespaces.{namespace}.maxGpus"
    return "maxGpusPerNamespace"


@dataclass(frozen=True)
class GpuBudget:
    """A namespace's GPU cap and what its running Jobs hold now."""

    namespace: str
    limit: int
    in_use: int
    rule: str

    @property
    def free(self) -> int:
        return max(0, self.limit - self.in_use)

    def wait_message(self, asked: int) -> str:
        """Why a launch of `asked` GPUs waits; names the numbers so the tenant sees what to free."""
        return (
            f"waiting for GPUs: this launch asks for {asked}; namespace {self.namespace} holds "
            f"{self.in_use} of its {self.limit} (policy {self.rule}); it starts when running "
            "jobs there finish"
        )


def namespace_gpu_budget(policy: PlatformPolicy, namespace: str, in_use: int) -> GpuBudget | None:
    limit = gpu_budget(policy, namespace)
    if limit is None:
        return None
    return GpuBudget(namespace, limit, in_use, _budget_rule(policy, namespace))


def trainer_service_account(
    policy: PlatformPolicy, namespace: str, default: str
) -> TrainerServiceAccount:
    """The ServiceAccount (name and creation annotations) of a namespace's trainer pods."""
    rules = policy.namespaces.get(namespace)
    chosen = rules.trainer_service_account if rules is not None else TrainerServiceAccount()
    return chosen.model_copy(update={"name": chosen.name or default})


def default_output(policy: PlatformPolicy, namespace: str) -> DefaultOutput | None:
    """The namespace's artifact store for resources without spec.output; None: the operator's."""
    rules = policy.namespaces.get(namespace)
    return rules.output if rules is not None else None
