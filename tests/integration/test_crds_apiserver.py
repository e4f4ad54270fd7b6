"""The generated CRDs on a real kube-apiserver: objects round-trip, bad ones are refused,
and status is a subresource."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.api import GROUP, KINDS, KINDS_BY_NAME, VERSION, FineTuneJobStatus
from graft.crdgen import build_crd
from tests.fixtures.cluster import ClusterInfo

pytestmark = pytest.mark.integration

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def _install_crds(client: Any) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    api = k8s.ApiextensionsV1Api(client)
    for info in KINDS:
        body = build_crd(info)
        try:
            api.create_custom_resource_definition(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = api.read_custom_resource_definition(info.crd_name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            api.replace_custom_resource_definition(info.crd_name, body)
    deadline = time.monotonic() + 30
    for info in KINDS:
        while True:
            crd = api.read_custom_resource_definition(info.crd_name)
            conditions = {c.type: c.status for c in (crd.status.conditions or [])}
            if conditions.get("Established") == "True":
                break
            assert time.monotonic() < deadline, f"{info.crd_name} not Established: {conditions}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def api(control_plane: ClusterInfo) -> Iterator[tuple[Any, str]]:
    from kubernetes import client as k8s

    client = control_plane.api_client()
    _install_crds(client)
    namespace = f"crd-test-{uuid.uuid4().hex[:6]}"
    core = k8s.CoreV1Api(client)
    core.create_namespace({"metadata": {"name": namespace}})
    yield k8s.CustomObjectsApi(client), namespace
    core.delete_namespace(namespace)


def _create(api: Any, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    plural = KINDS_BY_NAME[body["kind"]].plural
    created: dict[str, Any] = api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, body
    )
    return created


def _example_documents() -> list[dict[str, Any]]:
    return [doc for path in EXAMPLES for doc in yaml.safe_load_all(path.read_text())]


def test_every_kind_has_an_example() -> None:
    assert {d["kind"] for d in _example_documents()} == set(KINDS_BY_NAME)


@pytest.mark.parametrize(
    ("number", "document"),
    list(enumerate(_example_documents())),
    ids=lambda d: f"{d['kind']}-{d['metadata']['name']}" if isinstance(d, dict) else str(d),
)
def test_example_round_trips_unchanged(
    api: tuple[Any, str], number: int, document: dict[str, Any]
) -> None:
    custom, namespace = api
    # Examples may share names (examples/quickstart.yaml repeats the single-kind ones).
    name = f"example-{number}"
    _create(custom, namespace, {**document, "metadata": {**document["metadata"], "name": name}})
    plural = KINDS_BY_NAME[document["kind"]].plural
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    assert stored["spec"] == document["spec"]


def _minimal_job(name: str, **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://m/tiny/"},
            "dataset": {"uri": "s3://d/p.jsonl", "textTemplate": "{a}"},
            "training": training,
        },
    }


def test_structurally_wrong_object_is_rejected(api: tuple[Any, str]) -> None:
    from kubernetes.client.rest import ApiException

    custom, namespace = api
    with pytest.raises(ApiException) as caught:
        _create(custom, namespace, _minimal_job("wrong-type", maxSteps="x"))
    assert caught.value.status == 422
    assert "spec.training.maxSteps" in caught.value.body
    with pytest.raises(ApiException) as caught:
        _create(custom, namespace, _minimal_job("out-of-range", perDeviceTrainBatchSize=0))
    assert caught.value.status == 422


def test_full_status_is_stored_without_pruning(api: tuple[Any, str]) -> None:
    custom, namespace = api
    _create(custom, namespace, _minimal_job("status-shape", maxSteps=10))
    status = FineTuneJobStatus.model_validate(
        {
            "observedGeneration": 1,
            "phase": "Running",
            "conditions": [
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "PodRunning",
                    "message": "step 4 of 10",
                    "lastTransitionTime": "2026-11-28T03:00:00Z",
                    "observedGeneration": 1,
                }
            ],
            "attempts": 1,
            "jobName": "status-shape-train",
            "progress": {"step": 4, "totalSteps": 10, "percent": 40, "etaSeconds": 12},
            "metrics": {"trainLoss": 1.5, "evalLoss": 1.75, "bestStep": 4},
            "warnings": [{"type": "Overfitting", "sinceStep": 3, "message": "eval loss rising"}],
            "artifacts": {"checkpoints": "s3://b/p/checkpoints/"},
            "search": {
                "completed": 1,
                "best": {"trial": 0, "params": {"lora.r": 8}, "value": 0.5},
                "trials": [{"number": 0, "state": "Complete", "params": {"lora.r": 8}}],
            },
        }
    ).to_api()
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "finetunejobs", "status-shape", {"status": status}
    )
    stored = custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", "status-shape"
    )
    assert stored["status"] == status


def test_status_is_a_subresource(api: tuple[Any, str]) -> None:
    custom, namespace = api
    name = "subresource"
    _create(custom, namespace, _minimal_job(name, maxSteps=10))
    args = (GROUP, VERSION, namespace, "finetunejobs", name)

    # Status written through the main endpoint is ignored...
    custom.patch_namespaced_custom_object(*args, {"status": {"phase": "Running"}})
    assert "status" not in custom.get_namespaced_custom_object(*args)

    # ...and spec written through the status endpoint is ignored.
    custom.patch_namespaced_custom_object_status(
        *args, {"status": {"phase": "Running"}, "spec": {"training": {"maxSteps": 99}}}
    )
    stored = custom.get_namespaced_custom_object(*args)
    assert stored["status"] == {"phase": "Running"}
    assert stored["spec"]["training"] == {"maxSteps": 10}

    # A spec change bumps the generation; a status change does not.
    generation = stored["metadata"]["generation"]
    custom.patch_namespaced_custom_object(*args, {"spec": {"training": {"maxSteps": 20}}})
    after_spec = custom.get_namespaced_custom_object(*args)
    assert after_spec["metadata"]["generation"] == generation + 1
    assert after_spec["status"] == {"phase": "Running"}
    custom.patch_namespaced_custom_object_status(*args, {"status": {"phase": "Succeeded"}})
    assert custom.get_namespaced_custom_object(*args)["metadata"]["generation"] == generation + 1


def test_printer_columns_show_phase_progress_and_eval_loss(
    api: tuple[Any, str], control_plane: ClusterInfo, tmp_path: Path
) -> None:
    custom, namespace = api
    name = "columns"
    _create(custom, namespace, _minimal_job(name, maxSteps=10))
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "finetunejobs",
        name,
        {
            "status": {
                "phase": "Running",
                "progress": {"percent": 40},
                "metrics": {"evalLoss": 1.25},
            }
        },
    )
    # A fresh discovery cache: the CRDs may be newer than kubectl's cached resource list.
    cache = f"--cache-dir={tmp_path}"
    out = control_plane.kubectl(cache, "get", "ftj", name, "-n", namespace).stdout.decode()
    header, row = out.strip().splitlines()
    assert header.split()[:4] == ["NAME", "PHASE", "PROGRESS", "EVAL-LOSS"]
    assert row.split()[:4] == [name, "Running", "40", "1.25"]


def test_kubectl_explain_reads_the_model_descriptions(
    api: tuple[Any, str], control_plane: ClusterInfo, tmp_path: Path
) -> None:
    cache = f"--cache-dir={tmp_path}"
    deadline = time.monotonic() + 30
    while True:
        # The apiserver publishes CRD schemas to its OpenAPI document shortly after creation.
        result = control_plane.kubectl(cache, "explain", "ftj.spec.lora.r", check=False)
        text = result.stdout.decode()
        if result.returncode == 0 and "Adapter rank" in text:
            break
        assert time.monotonic() < deadline, result.stderr.decode() or text
        time.sleep(1)
    assert "Default: 16." in text
