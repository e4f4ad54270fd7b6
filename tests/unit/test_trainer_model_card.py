"""The model card published beside adapters: what the Hub reads and what a reader needs."""

from __future__ import annotations

from typing import Any

import yaml

from graft_trainer.model_card import render_model_card, spec_digest


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
        "dataset": {"uri": "hf://acme/tone-phrases", "format": "hf"},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        "training": {"maxSteps": 150, "learningRate": 0.01, "perDeviceTrainBatchSize": 16},
    }
    return {**base, **overrides}


def card(job_spec: dict[str, Any]) -> str:
    return render_model_card(
        name="tone",
        namespace="team-a",
        spec=job_spec,
        model_commit="a" * 40,
        dataset_digest="hf:acme/tone-phrases@" + "b" * 40,
        baseline={"eval_loss": 3.1875, "accuracy": 0.0},
        final={"eval_loss": 0.0244, "accuracy": 0.9667},
        run={"finalStep": 150, "bestStep": 125},
    )


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    return dict(yaml.safe_load(text.split("---\n")[1]))


def test_hub_sources_are_named_by_hub_id_with_commit_and_metrics_before_after() -> None:
    text = card(spec())
    front = front_matter(text)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["base_model_relation"] == "adapter" and front["library_name"] == "peft"
    assert front["datasets"] == ["acme/tone-phrases"]
    assert f"at commit `{'a' * 40}`" in text
    assert "| eval_loss | 3.188 | 0.0244 |" in text
    assert "| accuracy | 0 | 0.9667 |" in text
    assert "lora (r=8; alpha=16; targets q_proj, v_proj)" in text
    assert "| learningRate | 0.01 |" in text
    assert spec_digest(spec()) in text


def test_other_sources_keep_their_uri_and_a_full_fine_tune_is_a_transformers_model() -> None:
    s3 = spec(
        model={"uri": "s3://bucket/models/tiny/"},
        dataset={"uri": "s3://bucket/data.jsonl"},
        method="full",
        lora=None,
    )
    front = front_matter(card(s3))
    assert front["base_model"] == "s3://bucket/models/tiny/"
    assert front["library_name"] == "transformers" and "base_model_relation" not in front
    assert "datasets" not in front


def test_the_spec_digest_changes_with_the_spec() -> None:
    assert spec_digest(spec()) != spec_digest(spec(method="dora"))
    assert spec_digest(spec()) == spec_digest(dict(reversed(list(spec().items()))))
