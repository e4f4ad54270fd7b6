"""Two tenants on one cluster, each an attacker of the other (issue 15's threat model).

The operator serves two namespaces under a platform policy: each tenant has its own output
prefix, credentials Secret, trainer ServiceAccount and GPU budget. On the full local cluster with
the real trainer image:

- tenant B replaces a file of tenant A's newest checkpoint with a pickle that would call home
  when loaded: A's resume ends IntegrityCheckFailed naming the file, and the call never comes;
- a model folder holding an object key with `../` is refused before anything is loaded;
- a disallowed image, trustRemoteCode, too many GPUs, a PriorityClass not in the list and an
  output outside the tenant's prefix each end PolicyDenied with no Job; a launch over the
  namespace's GPU budget waits, and starts once GPUs are free;
- a trainer that fails on (and prints) its Secret's value: the value is redacted from its
  message, and found nowhere in status, Events or the operator's log.

(The operator's RBAC in namespaced mode is shown on the API server in
tests/integration/test_chart_rbac.py and test_operator_least_privilege.py.)
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import pickle
import secrets
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from e2e.quickstart import seed_store
from tests.integration.operator_kit import REPO, Cluster, Operator, host_operator, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

EXAMPLE = REPO / "examples" / "finetunejob.yaml"
SECRET_NAME = "tenant-s3"


@dataclass
class Tenant:
    cluster: Cluster
    prefix: str  # s3://bucket/<namespace>/: where this tenant may write
    secret_value: str  # its AWS_SECRET_ACCESS_KEY (the S3 test server accepts any)

    @property
    def ns(self) -> str:
        return self.cluster.ns


@dataclass
class Env:
    a: Tenant
    b: Tenant
    s3: Any
    operator: Operator
    trainer_image: str


class CallRecorder(http.server.BaseHTTPRequestHandler):
    """Counts requests: a pickle that ran would call it."""

    calls: list[str] = []

    def do_GET(self) -> None:
        CallRecorder.calls.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


class CallsHome:
    """Unpickling this calls the URL (the kind of payload `weights_only=False` would run)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __reduce__(self) -> Any:
        return (urllib.request.urlopen, (self.url,))


@pytest.fixture(scope="module")
def env(
    full_cluster: Any, s3: Any, trainer_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    from kubernetes import client

    work = tmp_path_factory.mktemp("tenants")
    seed_store(s3.client(), s3.bucket, work)
    full_cluster.kubectl("apply", "-f", str(REPO / "crds"))
    api = full_cluster.api_client()
    core = client.CoreV1Api(api)
    shared = core.read_namespaced_secret("graft-s3", "default").data
    tenants: list[Tenant] = []
    for letter in "ab":
        ns = f"tenant-{letter}-{uuid.uuid4().hex[:5]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        value = secrets.token_hex(20)
        data = dict(shared)
        data["AWS_ACCESS_KEY_ID"] = base64.b64encode(f"{ns}-key".encode()).decode()
        data["AWS_SECRET_ACCESS_KEY"] = base64.b64encode(value.encode()).decode()
        core.create_namespaced_secret(ns, {"metadata": {"name": SECRET_NAME}, "data": data})
        tenants.append(Tenant(Cluster(api, ns), f"s3://{s3.bucket}/{ns}/", value))
    a, b = tenants
    image_prefix = trainer_image.rsplit(":", 1)[0] + ":"
    policy = {
        "allowedImages": [image_prefix],
        "allowTrustRemoteCode": False,
        "maxGpusPerJob": 2,
        "allowedPriorityClasses": [],
        "namespaces": {
            t.ns: {
                "outputPrefixes": [t.prefix],
                "output": {"uri": t.prefix, "credentialsSecret": SECRET_NAME},
                "trainerServiceAccount": {
                    "name": f"{t.ns}-trainer",
                    "annotations": {"eks.amazonaws.com/role-arn": f"arn:aws:iam::1:role/{t.ns}"},
                },
                "maxGpus": 1,
            }
            for t in tenants
        },
    }
    op = host_operator(
        full_cluster,
        [a.ns, b.ns],
        work / "operator.log",
        trainer_image,
        GRAFT_POLICY=json.dumps(policy),
        GRAFT_PREFLIGHT_POD="false",  # the GPU budget is what this test counts
        GRAFT_OUTPUT_URI="",
        GRAFT_OUTPUT_SECRET="",
    )
    op.start()
    try:
        yield Env(a, b, s3, op, trainer_image)
    finally:
        op.stop()
        print(op.log.read_text()[-4000:] if op.log.exists() else "")
        for t in tenants:
            core.delete_namespace(t.ns)


def finetune(tenant: Tenant, name: str, **spec: Any) -> dict[str, Any]:
    """The example FineTuneJob in the tenant's namespace, on its own credentials, written to its
    namespace's default store (no spec.output)."""
    doc = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    doc["metadata"] = {"name": name, "namespace": tenant.ns}
    for location in ("model", "dataset"):
        doc["spec"][location]["credentialsSecret"] = SECRET_NAME
    doc["spec"].pop("output")
    doc["spec"].update(spec)
    result: dict[str, Any] = tenant.cluster.custom.create_namespaced_custom_object(
        "graft.dev", "v1alpha1", tenant.ns, "finetunejobs", doc
    )
    return result


def failed(tenant: Tenant, name: str, timeout: float = 300) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        cond = tenant.cluster.condition(name, "Failed")
        return cond if cond and cond["status"] == "True" else None

    return wait_for(f"{tenant.ns}/{name} to fail", probe, timeout, interval=0.5)


def keys_under(s3: Any, uri: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_tampered_checkpoint_is_refused_and_its_pickle_never_runs(env: Env) -> None:
    a, b = env.a, env.b
    training = {
        "maxSteps": 2000,
        "learningRate": 1e-2,
        "perDeviceTrainBatchSize": 16,
        "saveSteps": 10,
        "evalSteps": 1000,
        "loggingSteps": 5,
    }
    finetune(a, "victim", training=training)

    def checkpointed() -> Any:
        status = (a.cluster.ftj("victim") or {}).get("status") or {}
        return ((status.get("progress") or {}).get("step") or 0) >= 20 and status

    wait_for("the victim past its second checkpoint", checkpointed, 600, interval=0.5)
    pod = next(p for p in a.cluster.pods("victim") if p.status.phase == "Running")
    # Trainer pods run as the tenant's own ServiceAccount, made with the platform's annotation.
    assert pod.spec.service_account_name == f"{a.ns}-trainer"
    account = a.cluster.core.read_namespaced_service_account(f"{a.ns}-trainer", a.ns)
    assert account.metadata.annotations["eks.amazonaws.com/role-arn"].endswith(a.ns)

    a.cluster.patch_ftj("victim", {"suspend": True})
    wait_for("the victim's pods gone", lambda: not a.cluster.pods("victim"), 120)
    keys = keys_under(env.s3, a.prefix)
    done = sorted(k.rsplit("/", 1)[0] for k in keys if k.endswith("/manifest.json"))
    newest = max(d for d in done if "/checkpoints/" in d)
    assert f"{newest}/trainable.pt" in keys, keys

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CallRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/pickle-ran"
    try:
        # Tenant B, with its own keys, writes into A's prefix (one shared bucket: the store's
        # own policy is what stops this on AWS or MinIO; docs/security.md shows it).
        import boto3

        attacker = boto3.client(
            "s3",
            endpoint_url=env.s3.endpoint_url,
            aws_access_key_id=f"{b.ns}-key",
            aws_secret_access_key=b.secret_value,
            region_name=env.s3.region,
        )
        attacker.put_object(
            Bucket=env.s3.bucket,
            Key=f"{newest}/trainable.pt",
            Body=pickle.dumps({"weight": CallsHome(url)}),
        )
        a.cluster.patch_ftj("victim", {"suspend": False})
        refused = failed(a, "victim")
        assert refused["reason"] == "IntegrityCheckFailed", refused
        assert "trainable.pt" in refused["message"], refused
        assert a.cluster.phase("victim") == "Failed"
        assert CallRecorder.calls == [], CallRecorder.calls
    finally:
        server.shutdown()


def test_an_object_key_with_dotdot_is_refused(env: Env) -> None:
    a, b = env.a, env.b
    s3 = env.s3.client()
    bucket = env.s3.bucket
    # Tenant B publishes a "model" whose folder holds a key that climbs out of it.
    for key in keys_under(env.s3, f"s3://{bucket}/models/tiny-llama/"):
        name = key.rsplit("/", 1)[-1]
        s3.copy_object(
            Bucket=bucket, Key=f"{b.ns}/models/evil/{name}", CopySource=f"{bucket}/{key}"
        )
    s3.put_object(Bucket=bucket, Key=f"{b.ns}/models/evil/../../{a.ns}/planted.txt", Body=b"x")
    finetune(
        a,
        "climber",
        model={"uri": f"s3://{bucket}/{b.ns}/models/evil/", "credentialsSecret": SECRET_NAME},
        backoffLimit=0,
    )
    refused = failed(a, "climber")
    assert refused["reason"] == "IntegrityCheckFailed", refused
    assert "planted.txt" in refused["message"], refused


def test_policy_denials_launch_nothing_and_a_full_gpu_budget_waits(env: Env) -> None:
    a, b = env.a, env.b
    denied = {
        "image": ({"image": "docker.io/evil/trainer:1"}, "spec.image", "allowedImages"),
        "trust": (
            {
                "model": {
                    "uri": f"s3://{env.s3.bucket}/models/tiny-llama/",
                    "credentialsSecret": SECRET_NAME,
                    "trustRemoteCode": True,
                }
            },
            "spec.model.trustRemoteCode",
            "allowTrustRemoteCode",
        ),
        "gpus": ({"resources": {"gpu": 4}}, "spec.resources.gpu", "maxGpusPerJob"),
        "priority": (
            {"scheduling": {"priorityClassName": "system-cluster-critical"}},
            "spec.scheduling.priorityClassName",
            "allowedPriorityClasses",
        ),
        "steal": (
            {"output": {"uri": f"{b.prefix}stolen/", "credentialsSecret": SECRET_NAME}},
            "spec.output.uri",
            f"namespaces.{a.ns}.outputPrefixes",
        ),
    }
    for name, (spec, _, _) in denied.items():
        finetune(a, name, **spec)
    # GPUs: the node has none, so the first GPU job's pod stays pending, holding the budget.
    finetune(a, "gpu-holder", resources={"gpu": 1, "cpu": "100m", "memory": "1Gi"})
    wait_for("the GPU holder's Job", lambda: a.cluster.jobs("gpu-holder"), 60)
    finetune(a, "gpu-waiter", resources={"gpu": 1, "cpu": "100m", "memory": "1Gi"})
    # Tenant B's budget is its own.
    finetune(b, "gpu-other", resources={"gpu": 1, "cpu": "100m", "memory": "1Gi"})
    wait_for("tenant B's GPU Job", lambda: b.cluster.jobs("gpu-other"), 60)
    for name, (_, path, rule) in denied.items():
        cond = failed(a, name, 60)
        assert cond["reason"] == "PolicyDenied", cond
        assert cond["message"].startswith(f"{path}: ") and f"(policy {rule})" in cond["message"]
    waiting = a.cluster.wait_reason("gpu-waiter", "Running", "WaitingForGpuBudget")
    assert f"namespace {a.ns} holds 1 of its 1" in waiting["message"], waiting
    assert all(a.cluster.jobs(name) == [] for name in [*denied, "gpu-waiter"])
    a.cluster.custom.delete_namespaced_custom_object(
        "graft.dev", "v1alpha1", a.ns, "finetunejobs", "gpu-holder"
    )
    wait_for("the waiter launched once the GPU is free", lambda: a.cluster.jobs("gpu-waiter"), 90)
    for tenant, name in ((a, "gpu-waiter"), (b, "gpu-other")):
        tenant.cluster.custom.delete_namespaced_custom_object(
            "graft.dev", "v1alpha1", tenant.ns, "finetunejobs", name
        )


def test_a_secret_the_trainer_prints_reaches_no_status_event_or_operator_log(env: Env) -> None:
    a = env.a
    # A user pasted a credential into a path: the trainer fails on it, printing it in its log.
    leaked = a.secret_value
    finetune(
        a,
        "leaky",
        dataset={
            **yaml.safe_load(EXAMPLE.read_text())["spec"]["dataset"],
            "uri": f"s3://{env.s3.bucket}/{a.ns}/{leaked}/train.jsonl",
            "credentialsSecret": SECRET_NAME,
        },
        backoffLimit=0,
    )
    cond = failed(a, "leaky")
    # The trainer's own message held the value (it names the dataset it could not read): the
    # marker shows it was there and was replaced before it left the pod.
    assert "[redacted]" in cond["message"], cond
    status = json.dumps((a.cluster.ftj("leaky") or {})["status"])  # the spec holds it, by design
    events = json.dumps(
        [e.to_dict() for e in a.cluster.core.list_namespaced_event(a.ns).items], default=str
    )
    operator_log = env.operator.log.read_text()
    for where, text in (("status", status), ("events", events), ("operator log", operator_log)):
        assert leaked not in text, f"the Secret's value is in the {where}"
