"""Any causal LM the ONNX builder exports, shown: a tiny random-weight model of each
architecture `build_tiny_model` knows and the installed onnxruntime-genai builder exports is
fine-tuned by `graft run` (LoRA on the trainer's default target modules for that architecture:
Phi-3's packed qkv_proj, the others' q/k/v/o), exported with the adapter as graph inputs
(OptimizeJob, perplexity parity with PyTorch checked by the stage) and bundled (AdapterBundle,
smoke-tested by the stage). The bundle then loads in onnxruntime-genai, its adapter changes the
output, and its logits give the PyTorch base+adapter's perplexity.

A chain whose FineTuneJob trains a model the builder cannot export (GPT-2) is refused before it
trains; the same FineTuneJob alone trains.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.cli import main
from tests.export_kit import PROMPTS
from tests.integration.trainer_kit import TEMPLATE

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]

pytest.importorskip("onnxruntime_genai")

from graft_trainer.export import builder, bundle  # noqa: E402
from graft_trainer.export import validate as checks  # noqa: E402
from graft_trainer.methods import DEFAULT_TARGETS  # noqa: E402
from graft_trainer.testkit import (  # noqa: E402
    TINY_ARCHITECTURES,
    build_tiny_model,
    tone_records,
    write_tone_dataset,
)

# What the tests show (onnxruntime-genai 0.18): every tiny architecture the builder exports.
SHOWN = [a for a in TINY_ARCHITECTURES if a in builder.supported_architectures()]
EXPECTED = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
}
REFUSED = "GPT2LMHeadModel"
API = "graft.dev/v1alpha1"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the kit's phrases alone (its Llama is pretrained for a while; these models are random)
    return write_tone_dataset(tmp_path_factory.mktemp("data") / "phrases.jsonl", n=200)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Tiny matrices gain nothing from threads, and threads spin badly on a busy machine.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def finetune(name: str, model: Path, dataset: Path, steps: int = 40) -> dict[str, Any]:
    """A short LoRA on the trainer's default target modules (none named). Long enough that the
    random models learn where an answer starts: after fewer steps they learn only that every
    completion ends with EOS, answer EOS at once to every prompt, and fail the bundle's smoke
    test on some CPUs (AVX2 and AVX-512 round differently)."""
    return {
        "apiVersion": API,
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "dataset": {
                "uri": f"file://{dataset}",
                "trainSplit": "train[:80%]",
                "evalSplit": "train[80%:]",
                "textTemplate": TEMPLATE,
                "completionOnly": True,
                "maxSeqLength": 64,
            },
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {
                "maxSteps": steps,
                "learningRate": 1.0e-2,
                "perDeviceTrainBatchSize": 16,
                "loggingSteps": steps,
                "evalSteps": 1000,
                "saveSteps": 1000,
                "seed": 1,
            },
            "evaluation": {"metrics": ["loss"]},
        },
    }


def optimize(name: str, job: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "OptimizeJob",
        "metadata": {"name": name},
        "spec": {
            "source": {"fineTuneJobRef": {"name": job}},
            "adapterMode": "separate",
            "target": {"device": "cpu", "precision": "fp32"},
            "validate": {
                "prompts": PROMPTS,
                "maxNewTokens": 4,
                "parity": {"maxPerplexityIncrease": 0.001},
            },
        },
    }


def adapter_bundle(name: str, job: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "AdapterBundle",
        "metadata": {"name": name},
        "spec": {
            "adapters": [{"name": "tuned", "fineTuneJobRef": {"name": job}}],
            "target": {"device": "cpu", "precision": "fp32"},
            # several prompts: a tuned tiny model may end its answer at once after one of them
            "validate": {"prompts": PROMPTS, "maxNewTokens": 4},
        },
    }


def write(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_the_tiny_architectures_the_builder_exports_are_all_shown() -> None:
    assert set(SHOWN) >= EXPECTED, SHOWN
    assert REFUSED in TINY_ARCHITECTURES and REFUSED not in builder.supported_architectures()


@pytest.mark.parametrize("architecture", SHOWN)
def test_train_export_and_bundle(
    architecture: str,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = build_tiny_model(tmp_path / "model", architecture, seed=0)
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == [architecture]
    docs = [adapter_bundle("bundle", "ft"), optimize("onnx", "ft"), finetune("ft", model, dataset)]
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(write(tmp_path / "chain.yaml", docs)), "--reporter", "none"])
    out = capsys.readouterr().out
    assert code == 0, out
    runs = tmp_path / "graft-runs"

    # The trainer picked the architecture's own projections (Phi-3: the packed qkv_proj).
    adapter = runs / "ft" / "adapter"
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(DEFAULT_TARGETS[config["model_type"]]), targets

    # The OptimizeJob checked perplexity parity of its LoRA graph against PyTorch + adapter.
    metrics = json.loads((runs / "onnx" / "manifest.json").read_text())["metrics"]
    assert close(metrics["perplexityPyTorch"], metrics["perplexityOnnx"]), metrics

    # The bundle smoke-tested its adapter through onnxruntime-genai ...
    manifest = json.loads((runs / "bundle" / "manifest.json").read_text())
    (entry,) = manifest["adapters"]
    assert entry["smokeTest"] == "passed" and entry["rank"] == 8, entry
    assert sorted(manifest["targetModules"]) == sorted(targets)
    assert "  tuned: rank 8, smoke test passed" in out, out

    # ... it loads there, and the active adapter changes what it generates ...
    model_dir, adapter_file = runs / "bundle" / "model", runs / "bundle" / entry["file"]
    genai = checks.GenaiModel(model_dir, {"tuned": adapter_file})
    tuned = [genai.generate(p, 8, adapter="tuned").tokens for p in PROMPTS]
    plain = [genai.generate(p, 8).tokens for p in PROMPTS]
    assert tuned != plain, (tuned, plain)

    # ... and its logits are PyTorch's, with the adapter and without it.
    texts = [TEMPLATE.format(**r) for r in tone_records(12, seed=5)]
    ids = checks.tokenize_texts(model, texts)
    feeds = bundle.read_adapter_file(adapter_file)
    with_torch = checks.perplexity_torch(model, ids, adapter)
    with_onnx = checks.perplexity_onnx(model_dir, ids, feeds)
    base_torch = checks.perplexity_torch(model, ids)
    base_onnx = checks.perplexity_onnx(model_dir, ids)
    assert close(with_torch, with_onnx), (with_torch, with_onnx)
    assert close(base_torch, base_onnx), (base_torch, base_onnx)
    assert not close(with_torch, base_torch, rel=0.01), (with_torch, base_torch)


@pytest.mark.parametrize("kind", ["AdapterBundle", "OptimizeJob"])
def test_a_model_the_builder_cannot_export_is_refused_before_training(
    kind: str,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = build_tiny_model(tmp_path / "gpt2", REFUSED)
    export = adapter_bundle("out", "ft") if kind == "AdapterBundle" else optimize("out", "ft")
    field = (
        "spec.adapters[0].fineTuneJobRef"
        if kind == "AdapterBundle"
        else "spec.source.fineTuneJobRef"
    )
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "chain.yaml", [finetune("ft", model, dataset), export])
    start = time.perf_counter()
    assert main(["run", str(path), "--reporter", "none"]) == 2
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert f"error: {kind}/out: {field} (the base model FineTuneJob 'ft' trains): " in out, out
    assert f"architecture {REFUSED} cannot be exported" in out, out
    assert "supported: " in out and "LlamaForCausalLM" in out and "Phi3ForCausalLM" in out, out
    assert "FineTuneJob/ft" not in out, out  # it never ran
    assert not (tmp_path / "graft-runs").exists()
    assert seconds < 30, seconds


def test_a_model_the_builder_cannot_export_still_fine_tunes_alone(
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = build_tiny_model(tmp_path / "gpt2", REFUSED)
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "ft.yaml", [finetune("ft", model, dataset, steps=4)])
    assert main(["run", str(path), "--reporter", "none"]) == 0, capsys.readouterr().out
    adapter = tmp_path / "graft-runs" / "ft" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["c_attn", "c_proj"]
    assert (tmp_path / "graft-runs" / "ft" / "manifest.json").is_file()


def test_a_runtime_adapter_on_phi3_packed_mlp_is_refused_before_export(tmp_path: Path) -> None:
    """The builder splits Phi-3's gate_up_proj into gate_proj and up_proj MatMuls: an adapter on
    it cannot be served as graph inputs (merged, it exports fine)."""
    from graft_trainer.export import stages
    from graft_trainer.export.errors import ExportError
    from tests.export_kit import train_lora

    model = build_tiny_model(tmp_path / "phi3", "Phi3ForCausalLM")
    texts = [TEMPLATE.format(**r) for r in tone_records(16, seed=0)]
    adapter = train_lora(
        model,
        tmp_path / "adapter",
        texts,
        seed=1,
        r=4,
        targets=["qkv_proj", "gate_up_proj"],
        steps=1,
    )
    spec = {
        "baseModel": {"uri": "file:///models/phi3"},
        "adapters": [{"name": "mlp", "uri": "file:///adapters/mlp"}],
        "target": {"device": "cpu", "precision": "fp32"},
    }
    with pytest.raises(ExportError) as caught:
        stages.run_bundle(
            spec,
            base_model_dir=model,
            adapters=[stages.BundleAdapterInput("mlp", adapter)],
            out_dir=tmp_path / "out",
        )
    assert caught.value.field == "spec.adapters[0]" and caught.value.reason == "AdapterMismatch"
    assert "gate_up_proj" in caught.value.message and "adapterMode merge" in caught.value.message
    assert not (tmp_path / "out").exists()
