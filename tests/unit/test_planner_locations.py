"""Locations a trainer pod can reach: each PersistentVolumeClaim that a pvc:// location names is
mounted where the URI maps to (read-only unless the resource writes its output there); file://,
a folder of the machine `graft run` runs on, is refused on a cluster with a message saying so."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from graft.api.kinds import InvalidResource
from graft.controller import planner
from graft.controller.config import OperatorConfig
from graft.storage.uri import local_path

CONFIG = OperatorConfig(trainer_image="graft/trainer:test")


def resource(kind: str = "FineTuneJob", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "tune", "namespace": "team-a", "uid": "0123abcd-0000"},
        "spec": spec,
    }


def pod_of(obj: dict[str, Any], references: dict[str, Any] | None = None) -> dict[str, Any]:
    resolved = planner.admit(
        planner.resolve_spec(obj["spec"], CONFIG, obj["kind"], "team-a"), CONFIG, "team-a"
    )
    job = planner.build_trainer_job(
        obj, resolved.spec, CONFIG, spec_hash_="h", references=references
    )
    kubernetes_validate.validate(job, "1.28.0", strict=True)
    return dict(job["spec"]["template"]["spec"])


def mounts(pod: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """claim -> (mount path, read-only) of the trainer container."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    out = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        if mount["name"] in claims:
            claim = claims[mount["name"]]
            assert claim["readOnly"] == mount["readOnly"]
            out[claim["claimName"]] = (mount["mountPath"], mount["readOnly"])
    return out


def test_inputs_are_mounted_read_only_and_the_output_read_write() -> None:
    obj = resource(
        model={"uri": "pvc://models/tiny-llama/"},
        dataset={"uri": "pvc://team-data/phrases.jsonl", "textTemplate": "{phrase}"},
        output={"uri": "pvc://team-out/runs/"},
    )
    found = mounts(pod_of(obj))
    assert found == {
        "models": ("/mnt/graft/pvc/models", True),
        "team-data": ("/mnt/graft/pvc/team-data", True),
        "team-out": ("/mnt/graft/pvc/team-out", False),
    }
    # the mount is where the trainer looks for the URI's files
    path = local_path("pvc://models/tiny-llama/config.json")
    assert str(path).startswith(found["models"][0] + "/")


def test_one_claim_for_input_and_output_is_mounted_once_read_write() -> None:
    obj = resource(
        model={"uri": "pvc://shared/models/tiny/"},
        dataset={"uri": "s3://graft/data.jsonl", "textTemplate": "{phrase}"},
        output={"uri": "pvc://shared/out/"},
    )
    assert mounts(pod_of(obj)) == {"shared": ("/mnt/graft/pvc/shared", False)}


def test_what_a_referenced_finetunejob_wrote_is_read_only() -> None:
    obj = resource(
        "OptimizeJob",
        source={"fineTuneJobRef": {"name": "tone"}},
        output={"uri": "s3://graft/exports/"},
    )
    references = {
        "tone": {
            "uri": "pvc://team-out/runs/team-a/finetunejobs/tone-1234/",
            "spec": {
                "model": {"uri": "pvc://models/tiny/"},
                "output": {"uri": "pvc://team-out/runs/"},
            },
        }
    }
    assert mounts(pod_of(obj, references)) == {
        "models": ("/mnt/graft/pvc/models", True),
        "team-out": ("/mnt/graft/pvc/team-out", True),
    }


def test_file_locations_are_refused_on_a_cluster_naming_each_field() -> None:
    obj = resource(
        model={"uri": "file:///home/me/models/tiny/"},
        dataset={"uri": "s3://graft/data.jsonl", "textTemplate": "{phrase}"},
        output={"uri": "file:///tmp/out/"},
    )
    with pytest.raises(InvalidResource) as refused:
        pod_of(obj)
    assert [i.dotted for i in refused.value.issues] == ["spec.model.uri", "spec.output.uri"]
    assert "usable with `graft run` only" in str(refused.value)
    assert "pvc://claim/path" in str(refused.value)
