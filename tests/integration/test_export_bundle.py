"""AdapterBundle stage on a tiny Llama: one base, two adapters chosen per request, each equal
to its merged export; the compatibility contract and the refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.export_kit import PROMPT, ExportKit, export_kit
from tests.export_kit import PROMPTS as COMPARE

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

stages = pytest.importorskip("graft_trainer.export.stages")
pytest.importorskip("onnxruntime_genai")

from graft_trainer.export import builder, merge  # noqa: E402
from graft_trainer.export import validate as checks  # noqa: E402
from graft_trainer.export.errors import ExportError  # noqa: E402
from graft_trainer.export.manifest import model_digest  # noqa: E402

PROMPTS = [PROMPT, "<|user|>\nThe hotel<|end|>\n"]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> ExportKit:
    return export_kit(tmp_path_factory.getbasetemp() / "export-kit")


def spec(precision: str, names: tuple[str, ...] = ("alpha", "beta")) -> dict[str, Any]:
    return {
        "baseModel": {"uri": "file:///models/base"},
        "adapters": [{"name": n, "uri": f"file:///adapters/{n}"} for n in names],
        "target": {"device": "cpu", "precision": precision},
        "validate": {"prompts": PROMPTS, "maxNewTokens": 8},
    }


def inputs(kit: ExportKit) -> list[Any]:
    return [
        stages.BundleAdapterInput("alpha", kit.adapter_a, base_model_digest=model_digest(kit.base)),
        stages.BundleAdapterInput("beta", kit.adapter_b),
    ]


@pytest.fixture(scope="module")
def fp32_bundle(kit: ExportKit, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("bundle") / "fp32"
    return stages.run_bundle(
        spec("fp32"), base_model_dir=kit.base, adapters=inputs(kit), out_dir=out
    )


def merged_greedy(kit: ExportKit, adapter: Path, work: Path, tokens: int) -> list[list[int]]:
    merged = merge.merge_adapter(kit.base, adapter, work / "hf", "x")
    builder.build(merged, work / "onnx", precision="fp32", device="cpu")
    genai = checks.GenaiModel(work / "onnx")
    return [genai.generate(p, tokens).tokens for p in COMPARE]


def test_bundle_serves_each_adapter_like_its_merged_export(
    kit: ExportKit, fp32_bundle: Any, tmp_path: Path
) -> None:
    files = fp32_bundle.adapter_files
    assert set(files) == {"alpha", "beta"}
    genai = checks.GenaiModel(fp32_bundle.model_dir, files)
    alpha = [genai.generate(p, 12, adapter="alpha").tokens for p in COMPARE]
    beta = [genai.generate(p, 12, adapter="beta").tokens for p in COMPARE]
    base = [genai.generate(p, 12).tokens for p in COMPARE]
    # The active adapter decides the output ...
    assert alpha != beta and alpha != base and beta != base
    # ... and each adapter answers exactly like the export with that adapter merged in.
    assert alpha == merged_greedy(kit, kit.adapter_a, tmp_path / "a", 12)
    assert beta == merged_greedy(kit, kit.adapter_b, tmp_path / "b", 12)
    # The plain base export (served when no adapter is active) agrees with the LoRA graph.
    plain = checks.GenaiModel(fp32_bundle.model_dir, filename=stages.BASE_GRAPH)
    assert [plain.generate(p, 12).tokens for p in COMPARE] == base


def test_bundle_reports_and_manifest(kit: ExportKit, fp32_bundle: Any) -> None:
    reports = {r.name: r for r in fp32_bundle.reports}
    assert reports["alpha"].rank == 4 and reports["beta"].rank == 8
    assert reports["alpha"].target_modules == ["o_proj", "q_proj", "v_proj"]
    assert "gate_proj" in reports["beta"].target_modules
    for report in reports.values():
        assert report.smoke_test == "passed"
        assert report.decode_overhead is not None
        assert [g.prompt for g in report.generations] == PROMPTS
    manifest = json.loads((fp32_bundle.out_dir / "manifest.json").read_text())
    assert manifest["baseModelDigest"] == model_digest(kit.base)
    assert manifest["targetModules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    listed = {a["name"]: a for a in manifest["adapters"]}
    for name, path in fp32_bundle.adapter_files.items():
        entry = listed[name]
        assert entry["sha256"] == manifest["files"][entry["file"]]["sha256"]
        assert path.name == f"{name}.onnx_adapter"
    assert {"model/model.onnx", "model/base.onnx", "model/model.onnx.data"} <= set(
        manifest["files"]
    )
    assert manifest["noAdapter"]["filename"] == "base.onnx"
    assert fp32_bundle.status()["adapters"][0]["smokeTest"] == "passed"
    # alpha adapts no k_proj/mlp: its file leaves them out, the graph's rank-0 defaults apply.
    from graft_trainer.export import bundle

    alpha = bundle.read_adapter_file(fp32_bundle.adapter_files["alpha"])
    assert alpha and not any("k_proj" in n or ".mlp." in n for n in alpha)
    beta = bundle.read_adapter_file(fp32_bundle.adapter_files["beta"])
    assert any("gate_proj" in n for n in beta)


def test_int4_bundle_keeps_lora_float_and_measures_overhead(kit: ExportKit, tmp_path: Path) -> None:
    import onnx

    result = stages.run_bundle(
        spec("int4"), base_model_dir=kit.base, adapters=inputs(kit), out_dir=tmp_path / "int4"
    )
    graph = onnx.load(str(result.model_dir / "model.onnx"), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert "MatMulNBits" in ops.values()
    lora = {k: v for k, v in ops.items() if "/lora_" in k}
    assert lora and set(lora.values()) == {"MatMul"}
    assert all(r.smoke_test == "passed" for r in result.reports)
    assert all(r.decode_overhead is not None for r in result.reports)
    assert result.base_decode_tokens_per_second > 0
    genai = checks.GenaiModel(result.model_dir, result.adapter_files)
    outputs = {
        n: [genai.generate(p, 12, adapter=n).tokens for p in COMPARE] for n in ("alpha", "beta")
    }
    assert outputs["alpha"] != outputs["beta"]


def test_adapter_of_another_base_is_refused_naming_it(kit: ExportKit, tmp_path: Path) -> None:
    adapters = [
        stages.BundleAdapterInput("alpha", kit.adapter_a),
        stages.BundleAdapterInput("beta", kit.foreign_adapter),
    ]
    with pytest.raises(ExportError) as caught:
        stages.run_bundle(
            spec("int4"), base_model_dir=kit.base, adapters=adapters, out_dir=tmp_path / "x"
        )
    err = caught.value
    assert err.field == "spec.adapters[1]" and err.reason == "AdapterMismatch"
    assert "'beta'" in err.message and "q_proj" in err.message
    assert not (tmp_path / "x").exists()


def test_adapter_declaring_another_base_digest_is_refused(kit: ExportKit, tmp_path: Path) -> None:
    # As a FineTuneJob's adapter artifact declares it: manifest.json with baseModel.digest.
    import shutil

    adapter = tmp_path / "beta"
    shutil.copytree(kit.adapter_b, adapter)
    (adapter / "manifest.json").write_text(
        json.dumps({"kind": "adapter", "baseModel": {"digest": model_digest(kit.foreign_base)}})
    )
    adapters = [
        stages.BundleAdapterInput("alpha", kit.adapter_a),
        stages.BundleAdapterInput("beta", adapter),
    ]
    with pytest.raises(ExportError) as caught:
        stages.run_bundle(
            spec("int4"), base_model_dir=kit.base, adapters=adapters, out_dir=tmp_path / "x"
        )
    assert caught.value.field == "spec.adapters[1]"
    assert caught.value.reason == "BaseModelMismatch"
    assert "'beta'" in caught.value.message
    assert not (tmp_path / "x").exists()


def test_precision_the_device_cannot_run_is_refused(kit: ExportKit, tmp_path: Path) -> None:
    bad = spec("int4")
    bad["target"]["precision"] = "bf16"
    with pytest.raises(ExportError) as caught:
        stages.run_bundle(
            bad, base_model_dir=kit.base, adapters=inputs(kit), out_dir=tmp_path / "x"
        )
    assert caught.value.field == "spec.target.precision"
    assert "bf16 does not run on cpu" in caught.value.message
