"""Pre-flight checks of the export stages: refused before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai")

from graft_trainer.export import builder, stages
from graft_trainer.export.errors import ExportError


def config_dir(tmp_path: Path, architecture: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": [architecture], "num_hidden_layers": 2})
    )
    return tmp_path


def test_supported_architectures_come_from_the_installed_builder() -> None:
    supported = builder.supported_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(supported)
    assert list(supported) == sorted(supported)


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    spec = {"source": {"model": {"uri": "hf://org/gpt2"}}, "target": {"precision": "int4"}}
    with pytest.raises(ExportError) as caught:
        stages.run_optimize(
            spec, model_dir=config_dir(tmp_path / "m", "GPT2LMHeadModel"), out_dir=tmp_path / "o"
        )
    err = caught.value
    assert err.field == "spec.source.model" and err.reason == "UnsupportedArchitecture"
    assert "GPT2LMHeadModel" in err.message and "LlamaForCausalLM" in err.message
    assert not (tmp_path / "o").exists()


def test_missing_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no config\.json"):
        builder.preflight(tmp_path, "spec.baseModel")


@pytest.mark.parametrize(
    ("target", "field", "words"),
    [
        (
            {"device": "cpu", "precision": "fp16"},
            "spec.target.precision",
            "fp16 does not run on cpu",
        ),
        (
            {"device": "cpu", "precision": "bf16"},
            "spec.target.precision",
            "bf16 does not run on cpu",
        ),
        ({"device": "tpu", "precision": "int4"}, "spec.target.device", "'cpu' or 'cuda'"),
    ],
)
def test_precision_the_device_cannot_run_is_refused(
    tmp_path: Path, target: dict[str, str], field: str, words: str
) -> None:
    spec = {"source": {"model": {"uri": "hf://org/m"}}, "target": target}
    with pytest.raises(ExportError) as caught:
        stages.run_optimize(
            spec, model_dir=config_dir(tmp_path, "LlamaForCausalLM"), out_dir=tmp_path / "o"
        )
    assert caught.value.field == field and words in caught.value.message


def test_check_target_names_the_field() -> None:
    with pytest.raises(ExportError) as caught:
        builder.check_target("cpu", "bf16", field="spec.target")
    assert caught.value.field == "spec.target.precision"
    assert caught.value.reason == "UnsupportedPrecision"
    builder.check_target("cuda", "bf16")


def test_parity_without_eval_data_is_refused_up_front(tmp_path: Path) -> None:
    spec = {
        "source": {"model": {"uri": "hf://org/m"}},
        "target": {"precision": "int4"},
        "validate": {"parity": {"maxPerplexityIncrease": 0.1}},
    }
    with pytest.raises(ExportError) as caught:
        stages.run_optimize(
            spec, model_dir=config_dir(tmp_path, "LlamaForCausalLM"), out_dir=tmp_path / "o"
        )
    assert caught.value.field == "spec.validate.parity" and "eval data" in caught.value.message


def test_whole_resource_or_spec_is_accepted_and_errors_carry_field_paths(tmp_path: Path) -> None:
    resource = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "AdapterBundle",
        "metadata": {"name": "b"},
        "spec": {
            "baseModel": {"uri": "hf://org/m"},
            "adapters": [{"name": "a", "uri": "s3://b/a/"}, {"name": "a", "uri": "s3://b/c/"}],
        },
    }
    with pytest.raises(ExportError) as caught:
        stages.run_bundle(
            resource,
            base_model_dir=config_dir(tmp_path, "LlamaForCausalLM"),
            adapters=[],
            out_dir=tmp_path / "o",
        )
    assert caught.value.field == "spec.adapters[1].name"
    assert "already used" in caught.value.message


def test_unresolved_bundle_adapter_is_named(tmp_path: Path) -> None:
    spec = {
        "baseModel": {"uri": "hf://org/m"},
        "adapters": [{"name": "a", "uri": "s3://b/a/"}, {"name": "b", "uri": "s3://b/b/"}],
    }
    with pytest.raises(ExportError) as caught:
        stages.run_bundle(
            spec,
            base_model_dir=config_dir(tmp_path, "LlamaForCausalLM"),
            adapters=[stages.BundleAdapterInput("a", tmp_path)],
            out_dir=tmp_path / "o",
        )
    assert caught.value.field == "spec.adapters[1]" and "'b'" in caught.value.message
