"""spec.publish: a Hub repository the finished adapter is pushed to, beside spec.output."""

from __future__ import annotations

from typing import Any

import pytest

from graft.api import FineTuneJobSpec, InvalidResource, parse_spec


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny/"},
        "dataset": {"uri": "s3://data/p.jsonl", "textTemplate": "{phrase}\n{tone}"},
        "output": {"uri": "s3://artifacts/"},
    }
    spec.update(overrides)
    return spec


def _issue(spec: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(InvalidResource) as caught:
        parse_spec("FineTuneJob", spec)
    (issue,) = caught.value.issues
    return issue.dotted, issue.message


def test_a_publish_target_round_trips_and_defaults_to_nothing() -> None:
    assert FineTuneJobSpec.model_validate(_spec()).publish is None
    publish = {"uri": "hf://acme/tone-adapter", "revision": "v2", "credentialsSecret": "hf-write"}
    spec = FineTuneJobSpec.model_validate(_spec(publish=publish))
    assert spec.to_api()["publish"] == publish
    assert spec.to_api()["output"] == {"uri": "s3://artifacts/"}  # the working store stays


@pytest.mark.parametrize(
    ("publish", "field", "message"),
    [
        ({"uri": "s3://artifacts/tone/"}, "spec.publish.uri", "hf://org/name"),
        ({"uri": "pvc://models/tone"}, "spec.publish.uri", "spec.output"),
        ({"uri": "hf://acme"}, "spec.publish.uri", "hf://org/name"),
        ({"uri": "hf://acme/tone/sub/dir"}, "spec.publish.uri", "hf://org/name"),
        ({"uri": "hf://acme/tone", "revision": "a" * 40}, "spec.publish.revision", "a branch"),
        ({"uri": "hf://acme/tone", "revision": "v 2"}, "spec.publish.revision", "branch name"),
        (
            {"uri": "hf://acme/tone", "credentialsSecret": "Not_A_Name"},
            "spec.publish.credentialsSecret",
            "",
        ),
    ],
)
def test_a_publish_target_is_a_hub_branch(
    publish: dict[str, Any], field: str, message: str
) -> None:
    dotted, text = _issue(_spec(publish=publish))
    assert dotted == field and message in text, (dotted, text)


def test_an_hf_output_points_to_publish() -> None:
    dotted, text = _issue(_spec(output={"uri": "hf://acme/tone"}))
    assert dotted == "spec.output.uri"
    assert "spec.publish" in text and "checkpoints" in text


def test_publish_with_search_is_refused_for_now() -> None:
    search = {"space": {"training.learningRate": {"type": "float", "low": 1e-4, "high": 1e-2}}}
    dataset = {"uri": "s3://data/p.jsonl", "textTemplate": "{a}", "evalSplit": "train[90%:]"}
    dotted, text = _issue(_spec(dataset=dataset, search=search, publish={"uri": "hf://acme/tone"}))
    assert dotted == "spec.publish" and "search" in text
