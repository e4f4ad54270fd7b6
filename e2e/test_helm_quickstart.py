"""The chart on the full local cluster: helm install, the in-cluster operator runs the quickstart
chain (examples/quickstart.yaml: FineTuneJobs -> OptimizeJob -> AdapterBundle by reference) with
the real trainer image to Succeeded/Ready, and helm uninstall leaves no operator object behind."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import quickstart
from tests.fixtures.cluster import ClusterInfo, S3Info

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).parents[1] / "examples" / "quickstart.yaml"


def _operator_objects(api: Any, namespace: str, release: str) -> list[str]:
    from kubernetes import client as k8s

    selector = f"app.kubernetes.io/instance={release}"
    found = [
        f"Deployment/{d.metadata.name}"
        for d in k8s.AppsV1Api(api)
        .list_namespaced_deployment(namespace, label_selector=selector)
        .items
    ]
    core = k8s.CoreV1Api(api)
    found += [
        f"ServiceAccount/{s.metadata.name}"
        for s in core.list_namespaced_service_account(namespace, label_selector=selector).items
    ]
    found += [
        f"Service/{s.metadata.name}"
        for s in core.list_namespaced_service(namespace, label_selector=selector).items
    ]
    rbac = k8s.RbacAuthorizationV1Api(api)
    found += [
        f"ClusterRole/{r.metadata.name}"
        for r in rbac.list_cluster_role(label_selector=selector).items
    ]
    found += [
        f"ClusterRoleBinding/{r.metadata.name}"
        for r in rbac.list_cluster_role_binding(label_selector=selector).items
    ]
    return found


def s3_names(s3: S3Info, uri: str) -> set[str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=key)
    return {o["Key"][len(key) :] for o in listing.get("Contents", [])}


def test_helm_install_runs_the_quickstart_chain_and_uninstalls_cleanly(
    full_cluster: ClusterInfo,
    trainer_image: str,
    operator_image: str,
    s3: S3Info,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import helm_python
    from kubernetes import client as k8s

    api = full_cluster.api_client()
    release, operator_ns = "graft", "graft-system"
    namespace = f"quickstart-{uuid.uuid4().hex[:6]}"
    # Watch only this test's namespace: other tests run operators of their own.
    quickstart.install_operator(
        full_cluster.kubeconfig, api, operator_ns, release, watch_namespaces=[namespace]
    )
    try:
        (deployment,) = (
            k8s.AppsV1Api(api)
            .list_namespaced_deployment(
                operator_ns, label_selector=f"app.kubernetes.io/instance={release}"
            )
            .items
        )
        assert deployment.status.ready_replicas == 1

        quickstart.seed_store(s3.client(), s3.bucket, tmp_path_factory.mktemp("seed"))
        k8s.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
        quickstart.copy_secret(api, "graft-s3", "default", namespace)

        # `helm test`: its pod makes a suspended FineTuneJob in the watched namespace and
        # passes once the operator has reconciled it; its pod and rights are gone after.
        helm = helm_python.Config(
            kubeconfig_path=str(full_cluster.kubeconfig), namespace=operator_ns
        )
        tested = helm.test(release, timeout=180, logs=True)
        assert "Validated=True (Valid)" in tested["logs"], tested["logs"]
        listed = k8s.CustomObjectsApi(api).list_namespaced_custom_object(
            "graft.dev", "v1alpha1", namespace, "finetunejobs"
        )
        assert listed["items"] == []
        assert not [
            p.metadata.name
            for p in k8s.CoreV1Api(api).list_namespaced_pod(operator_ns).items
            if p.metadata.name.endswith("-test")
        ]
        docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
        quickstart.apply(api, namespace, docs)
        job, optimize, bundle = docs[0], docs[2], docs[3]

        seen_steps: set[int] = set()
        waiting: set[str] = set()

        def watch(obj: dict[str, Any]) -> None:
            step = ((obj.get("status") or {}).get("progress") or {}).get("step")
            if step is not None:
                seen_steps.add(step)
            other = quickstart.read(api, namespace, "optimizejobs", optimize["metadata"]["name"])
            running = quickstart.condition(other, "Running") or {}
            waiting.add(str(running.get("reason")))

        name = job["metadata"]["name"]
        done = quickstart.wait_until_done(
            api, namespace, "finetunejobs", name, timeout=600, on_poll=watch
        )
        status = done["status"]
        succeeded = quickstart.condition(done, "Succeeded")
        assert succeeded and succeeded["status"] == "True", json.dumps(status, indent=1)
        assert status["phase"] == "Succeeded"
        # Progress was seen moving while the pod trained, not only at the end.
        assert len(seen_steps) >= 2, seen_steps
        adapter = status["artifacts"]["adapter"]
        bucket, _, key = adapter.removeprefix("s3://").partition("/")
        manifest = json.loads(
            s3.client()
            .get_object(Bucket=bucket, Key=f"{key.rstrip('/')}/manifest.json")["Body"]
            .read()
        )
        assert manifest["files"], manifest
        assert status["metrics"]["evalLoss"] < 0.25 * status["metrics"]["baselineEvalLoss"]
        assert status["metrics"]["accuracy"] >= 0.9, status["metrics"]
        # The OptimizeJob waited for it, then exported and validated the int4 model.
        assert "WaitingForSource" in waiting, waiting
        optj = quickstart.wait_until_done(
            api, namespace, "optimizejobs", optimize["metadata"]["name"], timeout=600
        )
        assert optj["status"]["phase"] == "Succeeded", json.dumps(optj["status"], indent=1)
        metrics = optj["status"]["metrics"]
        assert metrics["sizeBytes"] > 0 and metrics["decodeTokensPerSecond"] > 0, metrics
        assert optj["status"]["generations"], optj["status"]
        model = optj["status"]["artifacts"]["model"]
        assert {"manifest.json", "genai_config.json", "model.onnx"} <= s3_names(s3, model)
        # The bundle serves both adapters over one base, each smoke-tested, before Ready.
        ab = quickstart.wait_until_done(
            api, namespace, "adapterbundles", bundle["metadata"]["name"], 600, done="Ready"
        )
        ready = quickstart.condition(ab, "Ready")
        assert ready and ready["status"] == "True", json.dumps(ab["status"], indent=1)
        # The kubelet's liveness probe (HTTP /healthz) passed all along: never restarted.
        operator_pods = (
            k8s.CoreV1Api(api)
            .list_namespaced_pod(
                operator_ns, label_selector=f"app.kubernetes.io/instance={release}"
            )
            .items
        )
        restarts = [c.restart_count for p in operator_pods for c in p.status.container_statuses]
        assert restarts == [0], restarts
        reports = {r["name"]: r for r in ab["status"]["adapters"]}
        assert set(reports) == {"tone", "verdict"}
        assert all(r["smokeTest"] == "passed" for r in reports.values()), reports
        # Each adapter answers every prompt with its own task's label (the two differ on each).
        answers = quickstart.adapter_answers(ab["status"])
        assert len(answers) == 6 and all(a["correct"] for a in answers), answers
        artifacts = ab["status"]["artifacts"]
        for adapter_name, uri in artifacts["adapters"].items():
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            size = s3.client().head_object(Bucket=bucket, Key=key)["ContentLength"]
            assert size > 0, adapter_name
        assert "genai_config.json" in s3_names(s3, artifacts["model"])
    finally:
        quickstart.uninstall_operator(full_cluster.kubeconfig, operator_ns, release)

    assert _operator_objects(api, operator_ns, release) == []
    # The CRDs are kept (crds.keep), and with them every user resource.
    crds = k8s.ApiextensionsV1Api(api).list_custom_resource_definition().items
    assert {"finetunejobs.graft.dev", "optimizejobs.graft.dev", "adapterbundles.graft.dev"} <= {
        c.metadata.name for c in crds
    }
    assert quickstart.read(api, namespace, "finetunejobs", name)["status"]["phase"] == "Succeeded"
