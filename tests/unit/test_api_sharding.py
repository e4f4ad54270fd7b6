"""training.sharding: FSDP for full fine-tunes; the combinations that cannot work are refused
with the field's path."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from graft.api import FineTuneJobSpec, InvalidResource, parse_spec
from graft.crdgen import crd_files


def _spec(method: str = "full", **sharding: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny/"},
        "dataset": {"uri": "s3://data/p.jsonl", "textTemplate": "{phrase}\n{tone}"},
        "method": method,
    }
    if sharding:
        spec["training"] = {"sharding": sharding}
    return spec


def _refusal(spec: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(InvalidResource) as caught:
        parse_spec("FineTuneJob", spec)
    [issue] = caught.value.issues
    return issue.dotted, str(issue)


def test_unset_sharding_is_none_and_leaves_existing_specs_unchanged() -> None:
    spec = FineTuneJobSpec.model_validate(_spec())
    assert spec.training.sharding is None and not spec.training.sharded
    # A spec without sharding dumps (and so digests, for its checkpoints) as before.
    assert "sharding" not in spec.to_api()["training"]


def test_fsdp_full_fine_tune_with_its_knobs() -> None:
    spec = FineTuneJobSpec.model_validate(_spec(strategy="fsdp", cpuOffload=True))
    assert spec.training.sharded
    assert spec.training.sharding is not None
    assert spec.training.sharding.mode == "full" and spec.training.sharding.cpu_offload
    none = FineTuneJobSpec.model_validate(_spec(strategy="none"))
    assert not none.training.sharded


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fsdp_with_an_adapter_method_is_refused(method: str) -> None:
    path, message = _refusal(_spec(method, strategy="fsdp"))
    assert path == "spec.training.sharding.strategy"
    assert "method full only" in message and f"a {method} adapter" in message


def test_fsdp_with_qlora_says_what_the_libraries_can_and_graft_cannot() -> None:
    path, message = _refusal(_spec("qlora", strategy="fsdp"))
    assert path == "spec.training.sharding.strategy"
    assert "bitsandbytes 0.50.2" in message and "does not train a sharded QLoRA" in message


def test_hybrid_sharding_waits_for_sharding_across_nodes() -> None:
    path, message = _refusal(_spec(strategy="fsdp", mode="hybrid"))
    assert path == "spec.training.sharding.mode"
    assert "sharding across resources.nodes is not built yet" in message


def test_sharding_across_nodes_is_refused_naming_the_strategy() -> None:
    spec = _spec(strategy="fsdp")
    spec["resources"] = {"nodes": 2}
    path, message = _refusal(spec)
    assert path == "spec.training.sharding.strategy"
    assert "runs within one pod" in message and "use strategy none" in message


def test_cpu_offload_needs_fsdp() -> None:
    path, message = _refusal(_spec(cpuOffload=True))
    assert path == "spec.training.sharding.cpuOffload"
    assert "needs strategy fsdp" in message


def test_kubectl_explain_describes_every_sharding_field() -> None:
    crd = yaml.safe_load(crd_files()["graft.dev_finetunejobs.yaml"])
    training = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["training"]["properties"]
    sharding = training["sharding"]
    assert "FSDP" in sharding["description"]
    assert set(sharding["properties"]) == {"strategy", "mode", "cpuOffload"}
    assert sharding["properties"]["strategy"]["enum"] == ["none", "fsdp"]
    assert all(p["description"] for p in sharding["properties"].values())
