"""OptimizeJob and AdapterBundle references: the pure gate, its conditions, and the launch."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from graft.controller import planner
from graft.controller.config import OperatorConfig
from graft.controller.sources import gate, references
from graft.controller.status import Observed, compute_status, find_condition, is_terminal

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
CONFIG = OperatorConfig(
    trainer_image="graft/trainer:test", output_uri="s3://store/graft/", output_secret="store-s3"
)
BASE = "s3://models/tiny-llama/"


def finetune(
    name: str, phase: str | None = "Succeeded", model: str = BASE, **spec: Any
) -> dict[str, Any]:
    conditions = []
    if phase in ("Succeeded", "Failed"):
        conditions.append(
            {
                "type": phase,
                "status": "True",
                "reason": "Completed" if phase == "Succeeded" else "OOMKilled",
                "message": "m",
            }
        )
    return {
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team", "uid": f"{name}-0000-uid"},
        "spec": {
            "model": {"uri": model, "credentialsSecret": "models-ro"},
            "dataset": {"uri": "s3://data/x.jsonl", "textTemplate": "{text}"},
            **spec,
        },
        "status": {
            "phase": phase,
            "conditions": conditions,
            "progress": {"percent": 40} if phase == "Running" else {},
        },
    }


def optimize_spec(ref: str = "tone") -> dict[str, Any]:
    return {"source": {"fineTuneJobRef": {"name": ref}}, "target": {"precision": "int4"}}


def bundle_spec(*refs: str, base: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "adapters": [{"name": f"a{i}", "fineTuneJobRef": {"name": r}} for i, r in enumerate(refs)]
    }
    if base:
        spec["baseModel"] = {"uri": base}
    return spec


def test_references_name_the_field_of_each_reference() -> None:
    assert [(r.field, r.name) for r in references("OptimizeJob", optimize_spec())] == [
        ("spec.source.fineTuneJobRef.name", "tone")
    ]
    spec = bundle_spec("x", "y")
    spec["adapters"].append({"name": "z", "uri": "s3://a/b/"})
    assert [(r.field, r.name) for r in references("AdapterBundle", spec)] == [
        ("spec.adapters[0].fineTuneJobRef.name", "x"),
        ("spec.adapters[1].fineTuneJobRef.name", "y"),
    ]
    assert references("FineTuneJob", {"model": {"uri": BASE}}) == []


def test_ready_gate_hands_over_artifact_prefix_and_resolved_spec() -> None:
    g = gate("OptimizeJob", "team", optimize_spec(), {"tone": finetune("tone")}, CONFIG)
    assert g.state == "ready"
    ref = g.references["tone"]
    # The operator's default output (and its secret) apply, as they did for the FineTuneJob.
    assert ref["uri"] == "s3://store/graft/team/finetunejobs/tone-tone0000/"
    assert ref["spec"]["output"] == {"uri": "s3://store/graft/", "credentialsSecret": "store-s3"}
    assert ref["spec"]["model"]["uri"] == BASE


def test_gate_waits_for_a_running_finetunejob_and_says_how_far_it_is() -> None:
    g = gate("OptimizeJob", "team", optimize_spec(), {"tone": finetune("tone", "Running")}, CONFIG)
    assert (g.state, g.reason) == ("waiting", "WaitingForSource")
    assert "FineTuneJob 'tone' (Running, 40%)" in g.message
    assert g.references == {}


def test_missing_and_failed_sources_name_the_field() -> None:
    g = gate("OptimizeJob", "team", optimize_spec("nope"), {"nope": None}, CONFIG)
    assert (g.state, g.reason) == ("missing", "SourceNotFound")
    assert g.message.startswith("spec.source.fineTuneJobRef.name: FineTuneJob 'nope' does not")
    g = gate("OptimizeJob", "team", optimize_spec(), {"tone": finetune("tone", "Failed")}, CONFIG)
    assert (g.state, g.reason) == ("failed", "SourceFailed")
    assert "FineTuneJob 'tone' failed (OOMKilled: m)" in g.message


def test_bundle_refuses_adapters_trained_on_different_base_models() -> None:
    found = {"a": finetune("a"), "b": finetune("b", model="s3://models/other/")}
    g = gate("AdapterBundle", "team", bundle_spec("a", "b"), found, CONFIG)
    assert (g.state, g.reason) == ("unusable", "SourceUnusable")
    assert g.message.startswith("spec.adapters[1].fineTuneJobRef.name: FineTuneJob 'b'")
    assert (
        "s3://models/other/" in g.message and "(spec.adapters[0].fineTuneJobRef.name)" in g.message
    )
    # An explicit baseModel is what every referenced job must agree with.
    g = gate(
        "AdapterBundle", "team", bundle_spec("a", base="s3://x/"), {"a": finetune("a")}, CONFIG
    )
    assert g.state == "unusable" and "(spec.baseModel.uri)" in g.message


def test_bundle_refuses_a_full_finetune_and_the_worst_problem_wins() -> None:
    found = {"a": finetune("a", method="full"), "b": None, "c": finetune("c", "Running")}
    g = gate("AdapterBundle", "team", bundle_spec("a", "b", "c"), found, CONFIG)
    assert g.state == "missing"  # the one the user must act on first
    del found["b"]
    g = gate("AdapterBundle", "team", bundle_spec("a", "c"), found, CONFIG)
    assert g.state == "unusable" and "method: full" in g.message


def resource(
    kind: str, spec: dict[str, Any], status: dict[str, Any] | None = None
) -> dict[str, Any]:
    obj = {
        "kind": kind,
        "metadata": {"name": "r", "namespace": "team", "uid": "r-uid", "generation": 1},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def test_waiting_resource_is_pending_and_launches_nothing() -> None:
    g = gate("OptimizeJob", "team", optimize_spec(), {"tone": finetune("tone", "Running")}, CONFIG)
    plan = compute_status(resource("OptimizeJob", optimize_spec()), Observed(source=g), NOW)
    assert not plan.create_job
    assert plan.status["phase"] == "Pending"
    running = find_condition(plan.status["conditions"], "Running")
    assert running is not None and running["reason"] == "WaitingForSource"
    assert plan.requeue_after is not None


def test_missing_source_fails_but_recovers_when_it_appears() -> None:
    missing = gate("OptimizeJob", "team", optimize_spec(), {"tone": None}, CONFIG)
    first = compute_status(resource("OptimizeJob", optimize_spec()), Observed(source=missing), NOW)
    assert first.status["phase"] == "Failed" and not first.create_job
    assert not is_terminal(first.status)  # recomputed on every pass
    assert any(e.reason == "SourceNotFound" and e.type == "Warning" for e in first.events)
    ready = gate("OptimizeJob", "team", optimize_spec(), {"tone": finetune("tone")}, CONFIG)
    again = compute_status(
        resource("OptimizeJob", optimize_spec(), first.status), Observed(source=ready), NOW
    )
    assert again.create_job
    failed = find_condition(again.status["conditions"], "Failed")
    assert failed is not None and failed["status"] == "False"


def test_bundle_is_ready_only_when_it_succeeded() -> None:
    spec = bundle_spec("a")
    waiting = gate("AdapterBundle", "team", spec, {"a": finetune("a", "Running")}, CONFIG)
    plan = compute_status(resource("AdapterBundle", spec), Observed(source=waiting), NOW)
    ready = find_condition(plan.status["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "WaitingForSource")
    done_job = {
        "metadata": {"name": "r-bundle", "uid": "j", "annotations": {}},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    plan = compute_status(
        resource("AdapterBundle", spec),
        Observed(launched_hash="h", current_hash="h", job=done_job),
        NOW,
    )
    ready = find_condition(plan.status["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("True", "BundleReady")
    # A FineTuneJob has no Ready condition.
    plan = compute_status(
        resource("FineTuneJob", {}),
        Observed(launched_hash="h", current_hash="h", job=done_job),
        NOW,
    )
    assert find_condition(plan.status["conditions"], "Ready") is None


def test_launch_of_an_optimizejob_freezes_references_and_reads_their_secrets() -> None:
    obj = resource("OptimizeJob", optimize_spec())
    resolved = planner.resolve_spec(obj["spec"], CONFIG, "OptimizeJob")
    refs = gate("OptimizeJob", "team", resolved.spec, {"tone": finetune("tone")}, CONFIG).references
    cm = planner.build_spec_configmap(obj, resolved, refs)
    job = planner.build_trainer_job(
        obj, resolved.spec, CONFIG, spec_hash_=resolved.spec_hash, references=refs
    )
    # Named per kind: a FineTuneJob of the same name has r-train and r-spec.
    assert job["metadata"]["name"] == "r-optimize"
    assert cm["metadata"]["name"] == "r-optimize-spec"
    assert job["metadata"]["labels"]["graft.dev/kind"] == "OptimizeJob"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "OptimizeJob"
    document = json.loads(cm["data"]["resource.json"])
    assert document["kind"] == "OptimizeJob"
    assert (
        document["references"]["tone"]["uri"] == "s3://store/graft/team/finetunejobs/tone-tone0000/"
    )
    assert planner.launched_references(cm) == refs
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GRAFT_ARTIFACTS_URI"] == "s3://store/graft/team/optimizejobs/r-ruid/"
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["models-ro", "store-s3"]
    volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "spec", "configMap": {"name": "r-optimize-spec"}} in volumes
