"""Operator configuration, read from the environment (the Helm chart sets these variables).

| variable | meaning | default |
|---|---|---|
| GRAFT_TRAINER_IMAGE | default trainer image (spec.image overrides) | graft/trainer:0.1.0 |
| GRAFT_TRAINER_IMAGE_PULL_POLICY | pull policy of trainer pods | IfNotPresent |
| GRAFT_TRAINER_HOST_NETWORK | trainer pods in the host network (single-node test clusters) | false |
| GRAFT_TRAINER_EXTRA_ENV | JSON object of extra env for trainer pods, e.g. KUBERNETES_SERVICE_HOST | {} |
| GRAFT_TRAINER_RUN_AS_USER | uid (and gid) of trainer pods | 1000 |
| GRAFT_TRAINER_SCRATCH_SIZE_LIMIT | sizeLimit of each trainer scratch emptyDir (quantity) | "" (none) |
| GRAFT_TRAINER_EPHEMERAL_STORAGE_REQUEST | ephemeral-storage request of trainer pods | "" (none) |
| GRAFT_OUTPUT_URI | default artifact store for resources without spec.output | "" |
| GRAFT_OUTPUT_SECRET | Secret (in each resource's namespace) with the store's credentials | "" |
| GRAFT_WATCH_NAMESPACES | comma-separated namespaces; empty watches all | "" |
| GRAFT_LOG_FORMAT | json or text | json |
| GRAFT_METRICS_PORT | port of /metrics and /healthz; 0 turns the endpoint off | 8080 |
| GRAFT_METRICS_HOST | address the metrics endpoint binds | 0.0.0.0 |
| GRAFT_RESYNC_SECONDS | period of the level-based resync of every resource | 60 |
| GRAFT_PROGRESS_SECONDS | how often a running FineTuneJob's progress is read from its trainer pod's log | 10 |
| GRAFT_DISRUPTION_ALLOWANCE | pod disruptions (evictions) retried beyond backoffLimit | 10 |
| GRAFT_WORKERS | concurrent reconciles | 32 |
| GRAFT_POLICY | platform policy as JSON (graft.policy.PlatformPolicy) | {} (allow all) |
| GRAFT_HF_ENDPOINT | Hub (or mirror) URL trainer pods fetch hf:// sources from (their HF_ENDPOINT) | "" (the public Hub) |
| GRAFT_HF_OFFLINE | trainer pods read hf:// sources only from their cache (HF_HUB_OFFLINE=1) | false |
| GRAFT_MODEL_CACHE_CLAIM | PersistentVolumeClaim (in each job's namespace) trainer pods use as their download cache | "" (none) |
| GRAFT_TRAINER_SERVICE_ACCOUNT | JSON {name, annotations}: trainer pods' ServiceAccount and the annotations it is created with (a namespace's policy overrides) | {} (graft-trainer) |
| GRAFT_PREFLIGHT_POD | check a GPU FineTuneJob in a CPU pod before its GPU pod is created | true |
| GRAFT_PREFLIGHT_CPU, GRAFT_PREFLIGHT_MEMORY | requests and limits of that pod | 1, 4Gi |
| GRAFT_TRAINER_POD | every trainer pod's platform settings as JSON (chart `trainer.pod`: imagePullSecrets, nodeSelector, tolerations, runtimeClassName, annotations, labels) | {} |
| GRAFT_TRAINER_METRICS_PORT | port of each trainer pod's Prometheus endpoint (container port `metrics`; the pod's GRAFT_TRAINER_METRICS_PORT); 0: none | 0 |
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from graft.chart_values import TrainerPodValues
from graft.policy import PlatformPolicy, TrainerServiceAccount, policy_from_json

TRUE = ("1", "true", "yes", "on")
M = TypeVar("M", bound=BaseModel)
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")


class ConfigError(ValueError):
    """A configuration variable that cannot be used; the message names it."""


def _json_model(env: Mapping[str, str], name: str, model: type[M]) -> M:
    """The variable `name` as JSON validated by `model` ({} when unset); ConfigError naming
    each bad field."""
    try:
        return model.model_validate_json(env.get(name, "").strip() or "{}")
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{name}: {problems}") from None


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = "graft/trainer:0.1.0"
    trainer_image_pull_policy: str = "IfNotPresent"
    trainer_host_network: bool = False
    trainer_extra_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    trainer_run_as_user: int = 1000
    trainer_service_account: str = "graft-trainer"
    # Annotations of every trainer ServiceAccount the operator creates (a policy's win).
    trainer_service_account_annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    trainer_scratch_size_limit: str = ""
    trainer_ephemeral_storage_request: str = ""
    output_uri: str = ""
    output_secret: str = ""
    watch_namespaces: tuple[str, ...] = ()
    log_format: str = "json"
    metrics_port: int = 8080
    metrics_host: str = "0.0.0.0"
    resync_seconds: float = 60.0
    # How often a running trainer's progress is read from its pod's log (controller.progress_log).
    progress_seconds: float = 10.0
    # How long a watch may owe a version the API server already showed before /healthz fails.
    watch_stale_seconds: float = 180.0
    disruption_allowance: int = 10
    workers: int = 32
    policy: PlatformPolicy = dataclasses.field(default_factory=PlatformPolicy)
    trainer_pod: TrainerPodValues = dataclasses.field(default_factory=TrainerPodValues)
    hub_endpoint: str = ""
    hub_offline: bool = False
    model_cache_claim: str = ""
    preflight_pod: bool = True
    preflight_cpu: str = "1"
    preflight_memory: str = "4Gi"
    # Each trainer pod's /metrics port (graft_trainer.observability); 0: no endpoint.
    trainer_metrics_port: int = 0
    # Multi-node jobs as Indexed Jobs (True) or one Job per node (False); None: as the API
    # server's version says (controller.gang.supports_indexed_jobs).
    indexed_jobs: bool | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        def text(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        def number(name: str, default: float, minimum: float = 0) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number") from None
            if value < minimum:
                raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
            return value

        raw_env = env.get("GRAFT_TRAINER_EXTRA_ENV", "").strip() or "{}"
        try:
            extra = json.loads(raw_env)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"GRAFT_TRAINER_EXTRA_ENV is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise ConfigError("GRAFT_TRAINER_EXTRA_ENV must be a JSON object of strings")
        log_format = text("GRAFT_LOG_FORMAT", "json").lower()
        if log_format not in ("json", "text"):
            raise ConfigError(f"GRAFT_LOG_FORMAT={log_format!r}: expected json or text")
        pull = text("GRAFT_TRAINER_IMAGE_PULL_POLICY", "IfNotPresent")
        if pull not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError(f"GRAFT_TRAINER_IMAGE_PULL_POLICY={pull!r}")

        def quantity(name: str) -> str:
            raw = env.get(name, "").strip()
            if raw and not QUANTITY.match(raw):
                raise ConfigError(f"{name}={raw!r} is not a quantity (expected e.g. 200Gi)")
            return raw

        try:
            policy = policy_from_json(env.get("GRAFT_POLICY", ""))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        trainer_pod = _json_model(env, "GRAFT_TRAINER_POD", TrainerPodValues)
        account = _json_model(env, "GRAFT_TRAINER_SERVICE_ACCOUNT", TrainerServiceAccount)
        hub_endpoint = env.get("GRAFT_HF_ENDPOINT", "").strip().rstrip("/")
        if hub_endpoint and not re.match(r"^https?://\S+$", hub_endpoint):
            raise ConfigError(
                f"GRAFT_HF_ENDPOINT={hub_endpoint!r}: expected an http:// or https:// URL"
            )
        trainer_metrics_port = int(number("GRAFT_TRAINER_METRICS_PORT", 0))
        if trainer_metrics_port > 65535:
            raise ConfigError(f"GRAFT_TRAINER_METRICS_PORT={trainer_metrics_port} is not a port")
        namespaces = tuple(
            n.strip() for n in env.get("GRAFT_WATCH_NAMESPACES", "").split(",") if n.strip()
        )
        indexed = env.get("GRAFT_INDEXED_JOBS", "").strip().lower() or "auto"
        if indexed not in ("auto", "true", "false"):
            raise ConfigError(f"GRAFT_INDEXED_JOBS={indexed!r}: expected auto, true or false")
        return cls(
            trainer_image=text("GRAFT_TRAINER_IMAGE", cls.trainer_image),
            trainer_image_pull_policy=pull,
            trainer_host_network=env.get("GRAFT_TRAINER_HOST_NETWORK", "").lower() in TRUE,
            trainer_extra_env={str(k): str(v) for k, v in extra.items()},
            trainer_run_as_user=int(number("GRAFT_TRAINER_RUN_AS_USER", 1000, 1)),
            trainer_service_account=account.name or cls.trainer_service_account,
            trainer_service_account_annotations=dict(account.annotations),
            trainer_scratch_size_limit=quantity("GRAFT_TRAINER_SCRATCH_SIZE_LIMIT"),
            trainer_ephemeral_storage_request=quantity("GRAFT_TRAINER_EPHEMERAL_STORAGE_REQUEST"),
            output_uri=env.get("GRAFT_OUTPUT_URI", "").strip(),
            output_secret=env.get("GRAFT_OUTPUT_SECRET", "").strip(),
            watch_namespaces=namespaces,
            log_format=log_format,
            metrics_port=int(number("GRAFT_METRICS_PORT", 8080)),
            metrics_host=text("GRAFT_METRICS_HOST", "0.0.0.0"),
            resync_seconds=number("GRAFT_RESYNC_SECONDS", 60.0, 1),
            progress_seconds=number("GRAFT_PROGRESS_SECONDS", 10.0, 1),
            watch_stale_seconds=number("GRAFT_WATCH_STALE_SECONDS", 180.0, 1),
            disruption_allowance=int(number("GRAFT_DISRUPTION_ALLOWANCE", 10)),
            workers=int(number("GRAFT_WORKERS", 32, 1)),
            policy=policy,
            trainer_pod=trainer_pod,
            hub_endpoint=hub_endpoint,
            hub_offline=env.get("GRAFT_HF_OFFLINE", "").strip().lower() in TRUE,
            model_cache_claim=env.get("GRAFT_MODEL_CACHE_CLAIM", "").strip(),
            preflight_pod=(env.get("GRAFT_PREFLIGHT_POD", "").strip().lower() or "true") in TRUE,
            preflight_cpu=quantity("GRAFT_PREFLIGHT_CPU") or cls.preflight_cpu,
            preflight_memory=quantity("GRAFT_PREFLIGHT_MEMORY") or cls.preflight_memory,
            trainer_metrics_port=trainer_metrics_port,
            indexed_jobs=None if indexed == "auto" else indexed == "true",
        )
