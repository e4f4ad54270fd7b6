"""The quickstart on a cluster: install the chart, seed the store, apply, watch.

Shared by `make demo` (e2e/demo.py) and the e2e tests, so the demo is exactly what is tested.
Talks to the cluster with the Kubernetes client and Helm v4 (helm-python-sdk), to S3 with boto3.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "graft"
LOCAL_VALUES = REPO / "helm" / "values-local.yaml"
GROUP, VERSION = "graft.dev", "v1alpha1"
MODEL_PREFIX = "models/tiny-llama/"
DATASET_KEY = "datasets/phrases.jsonl"


def seed_store(s3: Any, bucket: str, workdir: Path) -> dict[str, str]:
    """Build the tiny model and the phrase->tone data (once) and upload them to the bucket."""
    from graft_trainer.testkit import KIT_VERSION, build_kit

    kit = workdir / f"testkit-v{KIT_VERSION}"
    if not (kit / "tiny-llama" / "config.json").exists() or not (kit / "phrases.jsonl").exists():
        build_kit(kit)
    model_dir = kit / "tiny-llama"
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, MODEL_PREFIX + path.relative_to(model_dir).as_posix())
    s3.upload_file(str(kit / "phrases.jsonl"), bucket, DATASET_KEY)
    return {"model": f"s3://{bucket}/{MODEL_PREFIX}", "dataset": f"s3://{bucket}/{DATASET_KEY}"}


# Which label each quickstart adapter answers with (its FineTuneJob's labelField).
ADAPTER_TASKS = {"tone": "tone", "verdict": "verdict"}


def adapter_answers(bundle_status: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per adapter and validation prompt of a Ready quickstart bundle: what the adapter
    generated through onnxruntime-genai, what its task's right answer is, and whether they agree."""
    from graft_trainer.evaluation import normalize
    from graft_trainer.testkit import label_of, phrase_of

    rows = []
    for report in bundle_status.get("adapters") or []:
        task = ADAPTER_TASKS.get(report["name"], "tone")
        for gen in report.get("generations") or []:
            expected = label_of(gen["prompt"], task)
            rows.append(
                {
                    "adapter": report["name"],
                    "prompt": gen["prompt"],
                    "phrase": phrase_of(gen["prompt"]),
                    "output": gen["output"],
                    "expected": expected,
                    "correct": normalize(gen["output"]) == expected,
                }
            )
    return rows


def adopt_crds(api: Any, release: str, namespace: str) -> None:
    """Mark CRDs created outside Helm as the release's, so the chart takes them over.

    This is Helm's documented adoption path, and the upgrade path for users who applied
    crds/ with kubectl before installing the chart.
    """
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    ext = k8s.ApiextensionsV1Api(api)
    for plural in ("finetunejobs", "optimizejobs", "adapterbundles"):
        try:
            ext.patch_custom_resource_definition(
                f"{plural}.{GROUP}",
                {
                    "metadata": {
                        "labels": {"app.kubernetes.io/managed-by": "Helm"},
                        "annotations": {
                            "meta.helm.sh/release-name": release,
                            "meta.helm.sh/release-namespace": namespace,
                        },
                    }
                },
            )
        except ApiException as exc:
            if exc.status != 404:
                raise


def install_operator(
    kubeconfig: Path,
    api: Any,
    namespace: str,
    release: str = "graft",
    timeout: int = 240,
    watch_namespaces: list[str] | None = None,
) -> None:
    """helm install the chart with the local values and wait for the operator to be Ready."""
    import helm_python

    ensure_namespace(api, namespace)
    adopt_crds(api, release, namespace)
    values = yaml.safe_load(LOCAL_VALUES.read_text())
    if watch_namespaces is not None:
        values["watchNamespaces"] = watch_namespaces
    helm = helm_python.Config(kubeconfig_path=str(kubeconfig), namespace=namespace)
    if any(r.get("name") == release for r in helm.list()):
        helm.upgrade(str(CHART), release, values, wait="watcher", timeout=timeout)
    else:
        helm.install(str(CHART), release, values, wait="watcher", timeout=timeout)


def ensure_namespace(api: Any, namespace: str) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    try:
        k8s.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    except ApiException as exc:
        if exc.status != 409:
            raise


def delete(api: Any, namespace: str, plural: str, name: str, timeout: float = 60) -> None:
    """Delete a Graft object and wait until it is gone (its Job goes with it)."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    custom = k8s.CustomObjectsApi(api)
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            read(api, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.5)
    raise TimeoutError(f"{plural}/{name} still exists after {timeout:.0f}s")


def uninstall_operator(kubeconfig: Path, namespace: str, release: str = "graft") -> None:
    import helm_python

    helm = helm_python.Config(kubeconfig_path=str(kubeconfig), namespace=namespace)
    helm.uninstall(release, wait="watcher", timeout=120, ignore_not_found=True)


def copy_secret(api: Any, name: str, source_namespace: str, namespace: str) -> None:
    """Give a namespace the store's credentials Secret (admin side; the operator never reads it)."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    core = k8s.CoreV1Api(api)
    secret = core.read_namespaced_secret(name, source_namespace)
    body = {"metadata": {"name": name}, "type": secret.type, "data": secret.data}
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise


def apply(api: Any, namespace: str, documents: list[dict[str, Any]]) -> None:
    """Create (or replace the spec of) each Graft object."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from graft.api import KINDS_BY_NAME

    custom = k8s.CustomObjectsApi(api)
    for doc in documents:
        plural = KINDS_BY_NAME[doc["kind"]].plural
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, doc)
        except ApiException as exc:
            if exc.status != 409:
                raise


def read(api: Any, namespace: str, plural: str, name: str) -> dict[str, Any]:
    from kubernetes import client as k8s

    obj: dict[str, Any] = k8s.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, name
    )
    return obj


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return None


def wait_until_done(
    api: Any,
    namespace: str,
    plural: str,
    name: str,
    timeout: float,
    done: str = "Succeeded",
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll until `done` or Failed is True; returns the object. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        obj = read(api, namespace, plural, name)
        if on_poll is not None:
            on_poll(obj)
        for kind in (done, "Failed"):
            cond = condition(obj, kind)
            if cond and cond["status"] == "True":
                return obj
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{plural}/{name} not done after {timeout:.0f}s: {obj.get('status')}"
            )
        time.sleep(1)
