"""OptimizeJob stage on a tiny Llama: fp32, int8 and int4 exports load in onnxruntime-genai and
generate, parity holds for fp32 (and int8, within 2%) and is reported for int4, separate mode
equals merge mode. fp16 and bf16 need a GPU (bench/gpu_check.sh)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.export_kit import PROMPT, PROMPTS, ExportKit, export_kit

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

stages = pytest.importorskip("graft_trainer.export.stages")
pytest.importorskip("onnxruntime_genai")

from graft_trainer.export import validate as checks  # noqa: E402
from graft_trainer.export.errors import ExportError  # noqa: E402


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> ExportKit:
    return export_kit(tmp_path_factory.getbasetemp() / "export-kit")


def spec(precision: str, mode: str = "merge", parity: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": {"model": {"uri": "file:///models/base"}, "adapter": {"uri": "file:///a"}},
        "adapterMode": mode,
        "target": {"device": "cpu", "precision": precision},
        "validate": {"prompts": [PROMPT, "<|user|>\nThe food<|end|>\n"], "maxNewTokens": 8},
    }
    if parity is not None:
        body["validate"]["parity"] = {"maxPerplexityIncrease": parity}
    return body


@pytest.fixture(scope="module")
def fp32_merged(kit: ExportKit, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("opt") / "fp32-merged"
    return stages.run_optimize(
        spec("fp32", parity=0.001),
        model_dir=kit.base,
        adapter_dir=kit.adapter_a,
        eval_texts=kit.eval_texts,
        out_dir=out,
    )


def test_fp32_merged_export_generates_and_keeps_parity(fp32_merged: Any) -> None:
    out: Path = fp32_merged.out_dir
    for name in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"):
        assert (out / name).is_file(), name
    metrics = fp32_merged.metrics
    assert metrics.perplexity_increase is not None
    assert abs(metrics.perplexity_increase) < 1e-3
    assert metrics.size_bytes > 0 and metrics.conversion_seconds > 0
    assert metrics.decode_tokens_per_second > 0
    assert [g.prompt for g in fp32_merged.generations] == [PROMPT, "<|user|>\nThe food<|end|>\n"]
    # Loads again from disk and generates.
    assert checks.GenaiModel(out).generate(PROMPT, 4).tokens
    # The manifest is written last and lists every other file.
    manifest = json.loads((out / "manifest.json").read_text())
    others = {p.name for p in out.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == others
    assert manifest["adapterMode"] == "merge"
    assert manifest["baseModelDigest"] and manifest["libraries"]["onnxruntime-genai"]
    newest = max((out / n).stat().st_mtime_ns for n in others)
    assert (out / "manifest.json").stat().st_mtime_ns >= newest
    status = fp32_merged.status()
    assert status["metrics"]["perplexityPyTorch"] == metrics.perplexity_py_torch


def test_int4_export_generates_and_reports_parity(
    kit: ExportKit, fp32_merged: Any, tmp_path: Path
) -> None:
    result = stages.run_optimize(
        spec("int4"),
        model_dir=kit.base,
        adapter_dir=kit.adapter_a,
        eval_texts=kit.eval_texts,
        out_dir=tmp_path / "int4",
    )
    metrics = result.metrics
    assert metrics.perplexity_onnx is not None and metrics.perplexity_increase is not None
    assert metrics.perplexity_py_torch == pytest.approx(fp32_merged.metrics.perplexity_py_torch)
    print(f"int4 perplexity increase: {metrics.perplexity_increase:+.4%}")
    assert metrics.size_bytes < fp32_merged.metrics.size_bytes
    assert metrics.decode_tokens_per_second > 0
    assert all(isinstance(g.output, str) for g in result.generations)
    assert checks.GenaiModel(result.out_dir).generate(PROMPT, 4).tokens


def test_int8_export_generates_close_to_fp32(
    kit: ExportKit, fp32_merged: Any, tmp_path: Path
) -> None:
    """int8 (the CPU's other quantized precision): smaller than fp32, and its perplexity within
    the parity bound a user would set for it."""
    result = stages.run_optimize(
        spec("int8", parity=0.02),
        model_dir=kit.base,
        adapter_dir=kit.adapter_a,
        eval_texts=kit.eval_texts,
        out_dir=tmp_path / "int8",
    )
    metrics = result.metrics
    print(f"int8 perplexity increase: {metrics.perplexity_increase:+.4%}")
    assert metrics.perplexity_increase is not None and abs(metrics.perplexity_increase) < 0.02
    assert metrics.perplexity_py_torch == pytest.approx(fp32_merged.metrics.perplexity_py_torch)
    assert metrics.size_bytes < fp32_merged.metrics.size_bytes
    genai_config = json.loads((result.out_dir / "genai_config.json").read_text())
    assert genai_config["model"]["decoder"]["filename"] == "model.onnx"
    assert checks.GenaiModel(result.out_dir).generate(PROMPT, 4).tokens


def test_separate_adapter_matches_the_merged_export(
    kit: ExportKit, fp32_merged: Any, tmp_path: Path
) -> None:
    result = stages.run_optimize(
        spec("fp32", mode="separate", parity=0.001),
        model_dir=kit.base,
        adapter_dir=kit.adapter_a,
        eval_texts=kit.eval_texts,
        out_dir=tmp_path / "separate",
    )
    out = result.out_dir
    assert (out / stages.ADAPTER_FILE).is_file()
    assert abs(result.metrics.perplexity_increase) < 1e-3
    separate = checks.GenaiModel(out, {"default": out / stages.ADAPTER_FILE})
    merged = checks.GenaiModel(fp32_merged.out_dir)
    with_adapter = [separate.generate(p, 12, adapter="default").tokens for p in PROMPTS]
    assert with_adapter == [merged.generate(p, 12).tokens for p in PROMPTS]
    without = [separate.generate(p, 12).tokens for p in PROMPTS]
    assert without != with_adapter  # no adapter active: the base model
    assert [g.output for g in result.generations] == [g.output for g in fp32_merged.generations]


def test_parity_violation_fails_with_the_numbers(
    kit: ExportKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = checks.perplexity_onnx
    monkeypatch.setattr(checks, "perplexity_onnx", lambda *a, **k: real(*a, **k) * 1.5)
    with pytest.raises(ExportError) as caught:
        stages.run_optimize(
            spec("fp32", parity=0.1),
            model_dir=kit.base,
            adapter_dir=kit.adapter_a,
            eval_texts=kit.eval_texts,
            out_dir=tmp_path / "bad",
        )
    err = caught.value
    assert err.field == "spec.validate.parity.maxPerplexityIncrease"
    assert err.reason == "ParityExceeded"
    assert "50.00%" in err.message and "10.00%" in err.message
    assert err.details["metrics"]["perplexityIncrease"] == pytest.approx(0.5)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_adapter_of_another_base_is_refused_before_export(kit: ExportKit, tmp_path: Path) -> None:
    with pytest.raises(ExportError) as caught:
        stages.run_optimize(
            spec("int4"),
            model_dir=kit.base,
            adapter_dir=kit.foreign_adapter,
            out_dir=tmp_path / "x",
        )
    assert caught.value.field == "spec.source.adapter"
    assert "another base model" in caught.value.message
    assert not (tmp_path / "x").exists()
