"""Behaviour of the API models: defaults, cross-field rules, search helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.api import FineTuneJobSpec, InvalidResource, parse_object, parse_spec
from graft.api.finetune import template_fields
from graft.api.search import SearchParam, apply_params
from graft.cli import main

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny/"},
        "dataset": {"uri": "s3://data/p.jsonl", "textTemplate": "{phrase}\n{tone}"},
    }
    spec.update(overrides)
    return spec


def test_every_example_validates() -> None:
    assert EXAMPLES, "examples/ is empty"
    assert main(["validate", *map(str, EXAMPLES)]) == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_keep_every_field_they_set(path: Path) -> None:
    """What a user wrote survives a parse and dump unchanged (defaults only add)."""
    for document in yaml.safe_load_all(path.read_text()):
        dumped = parse_object(document).to_api()

        def contains(small: Any, big: Any) -> bool:
            if isinstance(small, dict):
                return all(k in big and contains(v, big[k]) for k, v in small.items())
            if isinstance(small, list):
                return len(small) == len(big) and all(map(contains, small, big))
            return bool(small == big or (str(small) == str(big)))

        assert contains(document["spec"], dumped["spec"])


def test_lora_and_qlora_get_their_defaults() -> None:
    lora = FineTuneJobSpec.model_validate(_spec())
    assert lora.method == "lora" and lora.lora is not None and lora.lora.r == 16
    assert lora.quantization is None
    qlora = FineTuneJobSpec.model_validate(_spec(method="qlora"))
    assert qlora.quantization is not None and qlora.quantization.type == "nf4"
    full = FineTuneJobSpec.model_validate(_spec(method="full"))
    assert full.lora is None


def test_parse_spec_prefixes_paths_with_spec() -> None:
    with pytest.raises(InvalidResource) as caught:
        parse_spec("FineTuneJob", _spec(training={"perDeviceTrainBatchSize": 0}))
    assert [i.dotted for i in caught.value.issues] == ["spec.training.perDeviceTrainBatchSize"]


def test_quantities_accept_numbers_and_strings() -> None:
    spec = FineTuneJobSpec.model_validate(_spec(resources={"cpu": 4, "memory": "32Gi"}))
    assert spec.resources.cpu == "4" and spec.resources.memory == "32Gi"


def test_secret_values_never_appear_in_errors() -> None:
    """A value placed where a Secret *name* belongs is echoed only as far as the name rule."""
    with pytest.raises(InvalidResource) as caught:
        parse_spec("FineTuneJob", _spec(model={"uri": "s3://m/", "credentialsSecret": "A" * 70}))
    assert "spec.model.credentialsSecret" in str(caught.value)


@pytest.mark.parametrize(
    ("template", "fields"),
    [("{phrase} -> {tone}", ["phrase", "tone"]), ("{{literal}} {x}", ["x"]), ("none", [])],
)
def test_template_fields(template: str, fields: list[str]) -> None:
    assert template_fields(template) == fields


@pytest.mark.parametrize("template", ["{a.b}", "{0}", "{a:>10}", "{a!r}", "{}"])
def test_template_fields_refuses_non_identifiers(template: str) -> None:
    with pytest.raises(ValueError, match="plain field name"):
        template_fields(template)


def test_apply_params_sets_dotted_paths_without_touching_the_original() -> None:
    spec = _spec(training={"maxSteps": 10})
    trial = apply_params(spec, {"training.learningRate": 0.01, "lora.r": 8})
    assert trial["training"] == {"maxSteps": 10, "learningRate": 0.01}
    assert trial["lora"] == {"r": 8}
    assert "lora" not in spec and spec["training"] == {"maxSteps": 10}


def test_grid_candidates() -> None:
    assert SearchParam(type="int", low=4, high=16, step=4).candidates() == [4, 8, 12, 16]
    assert SearchParam(type="choice", values=["a", 1]).candidates() == ["a", 1]
    with pytest.raises(ValueError, match="needs a step"):
        SearchParam(type="float", low=0.1, high=0.2).candidates()


def test_search_without_eval_split_is_refused() -> None:
    search = {"space": {"lora.r": {"type": "int", "low": 4, "high": 8}}}
    with pytest.raises(InvalidResource, match=r"spec\.search: search compares trials"):
        parse_spec("FineTuneJob", _spec(search=search))
