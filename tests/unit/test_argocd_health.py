"""The Argo CD health script, run by a real Lua runtime against fixture objects."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

from graft.argocd import HEALTH_LUA, SNIPPET, argocd_cm_snippet


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    # Argo CD runs the script as a chunk with `obj` in scope and reads the returned table.
    result = lua.execute(HEALTH_LUA.read_text())
    return result["status"], result["message"]


def condition(kind: str, status: str, generation: int = 1, message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": "Test",
        "message": message,
        "lastTransitionTime": "2026-11-28T00:00:00Z",
        "observedGeneration": generation,
    }


def resource(
    kind: str = "FineTuneJob", generation: int = 1, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def test_no_status_is_progressing() -> None:
    assert health(resource())[0] == "Progressing"


def test_succeeded_job_is_healthy() -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [
            condition("Validated", "True"),
            condition("Succeeded", "True", message="done"),
        ],
    }
    assert health(resource(status=status)) == ("Healthy", "done")


def test_bundle_is_healthy_only_when_ready() -> None:
    running = {
        "observedGeneration": 1,
        "conditions": [condition("Running", "True", message="exporting")],
    }
    assert health(resource("AdapterBundle", status=running)) == ("Progressing", "exporting")
    ready = {
        "observedGeneration": 1,
        "conditions": [condition("Ready", "True", message="2 adapters")],
    }
    assert health(resource("AdapterBundle", status=ready)) == ("Healthy", "2 adapters")
    # Succeeded means nothing for a bundle: only Ready does.
    succeeded = {"observedGeneration": 1, "conditions": [condition("Succeeded", "True")]}
    assert health(resource("AdapterBundle", status=succeeded))[0] == "Progressing"


def test_invalid_spec_and_failure_are_degraded() -> None:
    invalid = {
        "observedGeneration": 1,
        "conditions": [condition("Validated", "False", message="spec.lora.r: must be >= 1")],
    }
    assert health(resource(status=invalid)) == ("Degraded", "spec.lora.r: must be >= 1")
    failed = {
        "observedGeneration": 1,
        "conditions": [condition("Failed", "True", message="OOMKilled: lower the batch size")],
    }
    assert health(resource("OptimizeJob", status=failed)) == (
        "Degraded",
        "OOMKilled: lower the batch size",
    )


def test_suspended() -> None:
    status = {"observedGeneration": 1, "conditions": [condition("Suspended", "True")]}
    assert health(resource(status=status))[0] == "Suspended"


def test_running_shows_progress() -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [condition("Running", "True")],
        "progress": {"step": 40, "percent": 40},
    }
    assert health(resource(status=status)) == ("Progressing", "Training: 40%")


@pytest.mark.parametrize("stale", ["status", "condition"])
def test_status_for_an_older_generation_is_not_trusted(stale: str) -> None:
    status: dict[str, Any] = {
        "observedGeneration": 2 if stale == "condition" else 1,
        "conditions": [condition("Succeeded", "True", generation=1)],
    }
    assert health(resource(generation=2, status=status))[0] == "Progressing"


def test_snippet_registers_the_script_for_every_kind() -> None:
    assert SNIPPET.read_text() == argocd_cm_snippet(HEALTH_LUA.read_text()), "run `make crds`"
    data = yaml.safe_load(SNIPPET.read_text())["data"]
    assert set(data) == {
        f"resource.customizations.health.graft.dev_{k}"
        for k in ("FineTuneJob", "OptimizeJob", "AdapterBundle")
    }
    assert all(script.strip() == HEALTH_LUA.read_text().strip() for script in data.values())
