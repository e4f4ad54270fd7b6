"""The Helm chart's values as pydantic models: values.yaml and values.schema.json come from here.

Like the CRDs, the chart's configuration surface has one source of truth. `make crds` writes
`helm/graft/values.yaml` (every default, each commented with its description) and
`helm/graft/values.schema.json` (`additionalProperties: false` everywhere, so a typo in a
values file fails `helm install` instead of being ignored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from graft.api.base import Toleration
from graft.policy import PlatformPolicy, TrainerServiceAccount

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "graft"


class Values(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ImageValues(Values):
    repository: str = Field(default="graft/operator", description="Image name.")
    tag: str = Field(default="0.1.0", description="Image tag.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="When the kubelet pulls the image."
    )


class TrainerPodValues(Values):
    """Platform-wide settings of every trainer pod (a namespace's policy adds its own pool)."""

    image_pull_secrets: list[str] = Field(
        default_factory=list,
        description=(
            "Secrets (by name) the kubelet pulls trainer images with; each must exist in every "
            "namespace that runs jobs."
        ),
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels for every trainer pod (the spec's own labels win key by key).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations added to every trainer pod."
    )
    runtime_class_name: str = Field(
        default="", description="RuntimeClass of trainer pods (e.g. nvidia). Empty: the default."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of every trainer pod."
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels of every trainer pod (Graft's own labels cannot be overridden).",
    )


class HubValues(Values):
    """Where trainer pods fetch hf:// models and datasets."""

    endpoint: str = Field(
        default="",
        pattern=r"^$|^https?://[^\s]+$",
        description=(
            "Base URL of the Hugging Face Hub or of a mirror that speaks its download protocol "
            "(HF_ENDPOINT in trainer pods), e.g. https://hf-mirror.internal. Empty: the public Hub."
        ),
    )
    offline: bool = Field(
        default=False,
        description=(
            "Never reach the Hub: hf:// sources are read only from the trainer's Hugging Face "
            "cache (HF_HUB_OFFLINE=1), and a source not there fails as InvalidInput."
        ),
    )


class ModelCacheValues(Values):
    claim: str = Field(
        default="",
        pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description=(
            "PersistentVolumeClaim, looked up in each job's namespace, mounted into every "
            "trainer pod as its download cache (base models, hf:// snapshots, S3 inputs) so "
            "repeated jobs and search trials fetch a base model once. It must exist in each "
            "namespace that runs jobs (ReadWriteMany where pods land on several nodes). A "
            "resource's spec.resources.cacheClaim overrides it. Empty: no shared cache."
        ),
    )


class PreflightValues(Values):
    enabled: bool = Field(
        default=True,
        description=(
            "Run a FineTuneJob's data, model and memory checks in a small CPU pod (same image, "
            "no GPU request) before its GPU pod is created, so a bad dataset or model fails "
            "without holding GPUs; the findings appear in the Validated condition. Jobs "
            "without GPUs always check in their own pod."
        ),
    )
    cpu: str = Field(
        default="1",
        pattern=r"^[0-9]+(\.[0-9]+)?m?$",
        description="CPU request and limit of the pre-flight pod.",
    )
    memory: str = Field(
        default="4Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description=(
            "Memory request and limit of the pre-flight pod: it reads the whole dataset and "
            "the model's tokenizer, never its weights."
        ),
    )


class PodMonitorValues(Values):
    enabled: bool = Field(
        default=False,
        description=(
            "Create a Prometheus Operator PodMonitor (in the release namespace) that scrapes "
            "every trainer pod's port `metrics` in the namespaces the operator watches (all "
            "when watchNamespaces is empty). Needs trainer.metrics.port."
        ),
    )
    interval: str = Field(default="30s", description="Scrape interval.")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels the Prometheus instance selects on."
    )


class TrainerMetricsValues(Values):
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description=(
            "Port of each trainer pod's Prometheus endpoint (/metrics: step, tokens/s, train "
            "and eval loss, CPU, memory, GPU memory and utilisation), declared as the container "
            "port `metrics`. 0: no endpoint. In the host network (trainer.hostNetwork) the port "
            "is not declared (it would be a host port: one trainer pod per node) and trainer "
            "pods on one node share it: the first serves, the others train without an endpoint; "
            "set GRAFT_TRAINER_METRICS_HOST in trainer.extraEnv to bind another address than "
            "0.0.0.0."
        ),
    )
    pod_monitor: PodMonitorValues = Field(
        default_factory=PodMonitorValues, description="Prometheus Operator scraping."
    )


class TrainerValues(Values):
    image: str = Field(
        default="graft/trainer:0.1.0",
        description="Default trainer image; a resource's spec.image overrides it.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Pull policy of trainer pods."
    )
    host_network: bool = Field(
        default=False,
        description="Run trainer pods in the host network (only for single-node test clusters).",
    )
    extra_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of trainer pods."
    )
    scratch_size_limit: str = Field(
        default="",
        pattern=r"^$|^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description=(
            "sizeLimit of each trainer pod's scratch emptyDir (/tmp, and HOME where models are "
            "downloaded), e.g. 200Gi; a pod that writes more is evicted. Empty: no limit."
        ),
    )
    ephemeral_storage_request: str = Field(
        default="",
        pattern=r"^$|^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description=(
            "ephemeral-storage request of trainer pods, so they land on nodes with that much "
            "local disk free (the base model and checkpoints are written there). Empty: none."
        ),
    )
    pod: TrainerPodValues = Field(
        default_factory=TrainerPodValues,
        description="Platform-wide settings of every trainer pod.",
    )
    hub: HubValues = Field(
        default_factory=HubValues,
        description="Where trainer pods fetch hf:// models and datasets.",
    )
    model_cache: ModelCacheValues = Field(
        default_factory=ModelCacheValues,
        description="A download cache shared by trainer pods.",
    )
    service_account: TrainerServiceAccount = Field(
        default_factory=TrainerServiceAccount,
        description=(
            "The ServiceAccount trainer pods run as, which the operator creates in each "
            "namespace that runs jobs (name empty: graft-trainer), with these annotations: one "
            "cloud role for every tenant (IRSA, Workload Identity). A namespace's policy "
            "(policy.namespaces.<ns>.trainerServiceAccount) overrides the name and adds or "
            "overrides annotations."
        ),
    )
    preflight: PreflightValues = Field(
        default_factory=PreflightValues,
        description="The CPU pod that checks a GPU FineTuneJob before GPUs are requested.",
    )
    metrics: TrainerMetricsValues = Field(
        default_factory=TrainerMetricsValues,
        description="The Prometheus endpoint of trainer pods.",
    )


class OutputValues(Values):
    uri: str = Field(
        default="",
        description="Default artifact store (s3://bucket/prefix/) for resources without spec.output.",
    )
    credentials_secret: str = Field(
        default="",
        description="Secret (in each resource's namespace) with the store's AWS_* credentials.",
    )


class CrdValues(Values):
    enabled: bool = Field(
        default=True,
        description="Install and upgrade the CRDs with the chart (Helm never upgrades crds/).",
    )
    keep: bool = Field(
        default=True,
        description="Keep the CRDs, and so every Graft resource, when the release is uninstalled.",
    )


class RbacValues(Values):
    create: bool = Field(default=True, description="Create the operator's (Cluster)Roles.")
    scope: Literal["cluster", "namespaced"] = Field(
        default="cluster",
        description="cluster: watch all (or watchNamespaces) with ClusterRoles; namespaced: a "
        "Role and RoleBinding in each of watchNamespaces (default: the release namespace), "
        "and no rights anywhere else.",
    )


class ServiceAccountValues(Values):
    create: bool = Field(default=True, description="Create the operator's ServiceAccount.")
    name: str = Field(default="", description="Its name; empty uses the release's full name.")
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations of the operator's ServiceAccount (e.g. a cloud identity).",
    )


class ServiceMonitorValues(Values):
    enabled: bool = Field(default=False, description="Create a Prometheus Operator ServiceMonitor.")
    interval: str = Field(default="30s", description="Scrape interval.")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels the Prometheus instance selects on."
    )


class MetricsValues(Values):
    port: int = Field(default=8080, ge=1, le=65535, description="Port of /metrics and /healthz.")
    service: bool = Field(default=True, description="Create a Service for the metrics port.")
    service_monitor: ServiceMonitorValues = Field(
        default_factory=ServiceMonitorValues, description="Prometheus Operator scraping."
    )


class HelmTestValues(Values):
    namespace: str = Field(
        default="",
        description="Namespace where `helm test` creates its FineTuneJob (suspended: it never "
        "trains) and waits for the operator to reconcile it to Validated. It must be one the "
        "operator watches. Empty: the first of watchNamespaces, else the release namespace.",
    )
    timeout_seconds: int = Field(
        default=60, ge=5, description="How long the test waits for the Validated condition."
    )


class ResourceQuantities(Values):
    cpu: str | None = Field(default=None, description="CPU quantity.")
    memory: str | None = Field(default=None, description="Memory quantity.")


class ResourceValues(Values):
    requests: ResourceQuantities = Field(
        default_factory=lambda: ResourceQuantities(cpu="50m", memory="128Mi"),
        description="Operator pod requests.",
    )
    limits: ResourceQuantities = Field(
        default_factory=lambda: ResourceQuantities(memory="256Mi"),
        description="Operator pod limits.",
    )


class ChartValues(Values):
    """Values of the graft chart."""

    image: ImageValues = Field(default_factory=ImageValues, description="The operator image.")
    trainer: TrainerValues = Field(default_factory=TrainerValues, description="Trainer pods.")
    output: OutputValues = Field(
        default_factory=OutputValues, description="Default artifact store."
    )
    watch_namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to watch; empty watches all (cluster scope) or the release "
        "namespace (namespaced scope).",
    )
    log_format: Literal["json", "text"] = Field(default="json", description="Operator log format.")
    crds: CrdValues = Field(default_factory=CrdValues, description="CRD installation.")
    rbac: RbacValues = Field(default_factory=RbacValues, description="RBAC.")
    service_account: ServiceAccountValues = Field(
        default_factory=ServiceAccountValues, description="The operator's ServiceAccount."
    )
    metrics: MetricsValues = Field(default_factory=MetricsValues, description="Metrics endpoint.")
    resources: ResourceValues = Field(
        default_factory=ResourceValues, description="Operator pod resources."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Operator pod nodeSelector."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Operator pod tolerations."
    )
    affinity: dict[str, Any] = Field(default_factory=dict, description="Operator pod affinity.")
    priority_class_name: str = Field(
        default="", description="PriorityClass of the operator pod. Empty: the default."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        description="Secrets (by name, in the release namespace) to pull the operator image with.",
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of the operator pod."
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels of the operator pod (its selector labels cannot be overridden).",
    )
    host_network: bool = Field(
        default=False,
        description="Run the operator in the host network (only for single-node test clusters).",
    )
    extra_env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables of the operator, e.g. KUBERNETES_SERVICE_HOST "
        "on clusters whose service network pods cannot reach.",
    )
    global_: dict[str, Any] = Field(
        default_factory=dict,
        alias="global",
        description="Values an umbrella chart shares with its subcharts; Graft reads none.",
    )
    tests: HelmTestValues = Field(
        default_factory=HelmTestValues,
        description="`helm test`: a pod that proves the operator answers (operator image).",
    )
    policy: PlatformPolicy = Field(
        default_factory=PlatformPolicy,
        description="What tenants may run, enforced by the operator before it creates anything "
        "(reason PolicyDenied); see docs/security.md. Empty allows all.",
    )


def _schema_node(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return _schema_node(
            defs[node["$ref"].rsplit("/", 1)[-1]] | {k: v for k, v in node.items() if k != "$ref"},
            defs,
        )
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs", "default"):
            continue
        if key == "properties":
            out[key] = {name: _schema_node(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _schema_node(value, defs)
        elif key == "anyOf":
            out[key] = [_schema_node(sub, defs) for sub in value]
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        out["additionalProperties"] = False
    return out


def values_schema() -> str:
    raw = ChartValues.model_json_schema(by_alias=True)
    schema = {"$schema": "http://json-schema.org/draft-07/schema#"} | _schema_node(
        raw, raw.get("$defs", {})
    )
    return json.dumps(schema, indent=2) + "\n"


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value)


def _render(model: BaseModel, indent: int) -> list[str]:
    lines: list[str] = []
    pad = "  " * indent
    for name, info in type(model).model_fields.items():
        key = info.alias or name
        value = getattr(model, name)
        if value is None:
            continue
        if info.description:
            lines.append(f"{pad}# {info.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{key}:")
            lines.extend(_render(value, indent + 1))
        else:
            lines.append(f"{pad}{key}: {_yaml_scalar(value)}")
    return lines


def values_yaml() -> str:
    header = "# Generated by `make crds` from operator/graft/chart_values.py. Do not edit.\n"
    return header + "\n".join(_render(ChartValues(), 0)) + "\n"


def write_chart_files(chart_dir: Path = CHART_DIR) -> None:
    (chart_dir / "values.yaml").write_text(values_yaml())
    (chart_dir / "values.schema.json").write_text(values_schema())
    print(f"wrote {chart_dir / 'values.yaml'} and values.schema.json")


if __name__ == "__main__":
    write_chart_files()
