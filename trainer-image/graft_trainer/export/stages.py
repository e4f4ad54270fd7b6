"""The OptimizeJob and AdapterBundle stages: local directories in, one output directory out.

The caller (the trainer pod's entry point, or `graft run`) resolves references and downloads:
it passes the base model directory, adapter directories and eval texts as local paths and
uploads `out_dir` afterwards (`graft.storage.write_artifact(out_dir, uri, result.manifest)`).
Each stage checks its input before any heavy work (pre-flight), exports, validates, and writes
`manifest.json` last; a refused input or a failed check raises `ExportError` with the field.

OptimizeJob output (`out_dir`): an ONNX Runtime GenAI directory (genai_config.json,
model.onnx + model.onnx.data, tokenizer files); with `adapterMode: separate` model.onnx has
LoRA inputs, `base.onnx` is the plain base, and `adapter.onnx_adapter` is the adapter
(activate it as "default"); then manifest.json.

AdapterBundle output (`out_dir`): `model/` (genai_config.json pointing at `model.onnx`, the base
graph with LoRA inputs; `base.onnx`, the same base without LoRA branches, served when no
adapter is active; both share `model.onnx.data`), `adapters/<name>.onnx_adapter`, then
manifest.json. `adapterMode: separate` gives the OptimizeJob the same layout in `out_dir`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from graft.api.bundle import AdapterBundleSpec, AdapterReport
from graft.api.errors import field_issues
from graft.api.optimize import Generation, OptimizeJobSpec, OptimizeMetrics
from graft_trainer.export import builder, bundle
from graft_trainer.export.errors import ExportError
from graft_trainer.export.manifest import (
    declared_base_digest,
    directory_size,
    library_versions,
    model_digest,
    same_digest,
    write_manifest,
)

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.onnx_adapter"
# The plain base graph beside the LoRA graph (model.onnx); both read model.onnx.data.
BASE_GRAPH = "base.onnx"
# What a server overlays on genai_config.json to serve the plain base when no adapter is chosen:
#   og.Model(og.Config(dir).overlay(NO_ADAPTER_OVERLAY))
NO_ADAPTER_OVERLAY = '{"model": {"decoder": {"filename": "base.onnx"}}}'
SEPARATE_ADAPTER_NAME = "default"
SMOKE_PROMPT = "Hello"
DECODE_TOKENS = 32

Log = Callable[[str], None]
SpecT = TypeVar("SpecT", bound=BaseModel)


def _parse_spec(obj: Any, model: type[SpecT]) -> SpecT:
    """A spec model from a model, a resource dict ({"spec": ...}) or a spec dict."""
    if isinstance(obj, model):
        return obj
    if isinstance(obj, Mapping):
        body = obj.get("spec", obj) if "spec" in obj or "kind" in obj else obj
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            issues = field_issues(exc, prefix=("spec",))
            message = "; ".join([issues[0].message] + [str(i) for i in issues[1:]])
            raise ExportError(issues[0].dotted, message[:2000]) from None
    raise TypeError(f"expected {model.__name__} or a mapping, got {type(obj).__name__}")


def _check_device_runtime(device: str) -> None:
    if device == "cuda":
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            raise ExportError(
                "spec.target.device",
                "the export targets cuda, but this trainer's onnxruntime-genai has no CUDA: "
                "it cannot validate the model; run the job on a GPU node with a CUDA image",
                "DeviceUnavailable",
            )


def export_with_lora_inputs(
    model_dir: Path,
    out_dir: Path,
    precision: str,
    device: str,
    target_modules: Sequence[str],
    shapes: Mapping[str, tuple[int, int]],
) -> bundle.GraphAdapterSpec:
    """The plain export, kept as `base.onnx`, and `model.onnx`: the same graph with LoRA
    inputs on `target_modules`. Both share the weights in `model.onnx.data`."""
    builder.build(model_dir, out_dir, precision=precision, device=device)
    (out_dir / "model.onnx").rename(out_dir / BASE_GRAPH)
    return bundle.add_lora_inputs(
        out_dir / BASE_GRAPH, out_dir / "model.onnx", target_modules, shapes
    )


def plain_base_location(bundle_dir: Path, manifest: Mapping[str, Any]) -> tuple[Path, str]:
    """(model directory, graph file name) of a bundle's plain base, from its manifest."""
    entry = manifest.get("noAdapter") or {}
    return Path(bundle_dir) / str(entry.get("model", "model/")), str(
        entry.get("filename", BASE_GRAPH)
    )


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _generations(results: Sequence[Any]) -> list[Generation]:
    return [Generation(prompt=r.prompt, output=r.output) for r in results]


# ---------------------------------------------------------------------------------------------
# OptimizeJob


@dataclass
class OptimizeResult:
    """What the OptimizeJob stage produced; `status()` is the status fields it fills."""

    out_dir: Path
    metrics: OptimizeMetrics
    generations: list[Generation]
    manifest: dict[str, Any]

    def status(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics.to_api(),
            "generations": [g.to_api() for g in self.generations],
        }


@dataclass
class _OptimizeInputs:
    """What the OptimizeJob's pre-flight found: the checked adapter and the texts to measure."""

    adapter_field: str
    separate: bool  # the adapter stays separate (graph inputs + .onnx_adapter), not merged
    peft_adapter: bundle.PeftAdapter | None
    shapes: Any  # bundle.base_linear_shapes(model_dir)
    texts: list[str]


def run_optimize(
    spec: OptimizeJobSpec | Mapping[str, Any],
    *,
    model_dir: Path,
    out_dir: Path,
    adapter_dir: Path | None = None,
    eval_texts: Sequence[str] | None = None,
    work_dir: Path | None = None,
    on_progress: Log | None = None,
) -> OptimizeResult:
    """Export `model_dir` (+ `adapter_dir`) to `out_dir` and validate it.

    `model_dir`: the base (or full) model, a local Hugging Face directory — for a
    `fineTuneJobRef` the job's base model. `adapter_dir`: the PEFT adapter (the source's
    `adapter`, or the FineTuneJob's adapter artifact). `eval_texts`: the texts perplexity is
    measured on (for a FineTuneJob, its eval split rendered with its textTemplate); without
    them the validate prompts are used.
    """
    say = on_progress or log.info
    parsed = _parse_spec(spec, OptimizeJobSpec)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    inputs = _optimize_preflight(parsed, model_dir, out_dir, adapter_dir, eval_texts)
    started = time.time()
    conversion_seconds, feeds = _optimize_export(
        parsed, inputs, model_dir, out_dir, adapter_dir, work_dir, say
    )
    metrics = OptimizeMetrics(
        size_bytes=directory_size(out_dir), conversion_seconds=round(conversion_seconds, 3)
    )
    generations = _optimize_validate(
        parsed, inputs, metrics, model_dir, out_dir, adapter_dir, feeds, say
    )
    _check_parity(parsed, metrics, generations)
    peft_adapter, separate = inputs.peft_adapter, inputs.separate
    body = {
        "kind": "onnx-model",
        "producer": "OptimizeJob",
        "spec": parsed.to_api(),
        "target": {"device": parsed.target.device, "precision": parsed.target.precision},
        "adapterMode": parsed.adapter_mode if adapter_dir is not None else None,
        "baseModelDigest": model_digest(model_dir),
        "adapter": (
            {
                "file": ADAPTER_FILE if separate else None,
                "activateAs": SEPARATE_ADAPTER_NAME if separate else None,
                "rank": peft_adapter.rank,
                "targetModules": peft_adapter.target_modules,
            }
            if peft_adapter is not None
            else None
        ),
        "metrics": metrics.to_api(),
        "generations": [g.to_api() for g in generations],
        "evalTexts": len(inputs.texts),
        "libraries": library_versions(),
        "startTime": started,
        "endTime": time.time(),
    }
    manifest = write_manifest(out_dir, body)
    return OptimizeResult(
        out_dir=out_dir, metrics=metrics, generations=generations, manifest=manifest
    )


def _optimize_preflight(
    parsed: OptimizeJobSpec,
    model_dir: Path,
    out_dir: Path,
    adapter_dir: Path | None,
    eval_texts: Sequence[str] | None,
) -> _OptimizeInputs:
    """Every cheap check, before anything heavy: target, model, adapter, texts, output."""
    by_ref = parsed.source.fine_tune_job_ref is not None
    source_field = "spec.source.fineTuneJobRef" if by_ref else "spec.source.model"
    adapter_field = "spec.source.fineTuneJobRef" if by_ref else "spec.source.adapter"
    device, precision = parsed.target.device, parsed.target.precision
    validate = parsed.validate_
    builder.check_target(device, precision)
    builder.preflight(model_dir, source_field)
    separate = adapter_dir is not None and parsed.adapter_mode == "separate"
    peft_adapter = None
    shapes = bundle.base_linear_shapes(model_dir)
    if adapter_dir is not None:
        peft_adapter = bundle.read_peft_adapter(Path(adapter_dir), adapter_field, runtime=separate)
        bundle.check_against_base(peft_adapter, shapes, name="adapter", field=adapter_field)
        if separate:
            bundle.check_runtime_modules(peft_adapter, name="adapter", field=adapter_field)
    texts = [t for t in (eval_texts or validate.prompts) if t.strip()]
    if validate.parity is not None and not texts:
        raise ExportError(
            "spec.validate.parity",
            "perplexity parity needs eval data: the source has none and validate.prompts is empty",
        )
    _check_device_runtime(device)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError("", f"output directory {out_dir} is not empty")
    return _OptimizeInputs(adapter_field, separate, peft_adapter, shapes, texts)


def _optimize_export(
    parsed: OptimizeJobSpec,
    inputs: _OptimizeInputs,
    model_dir: Path,
    out_dir: Path,
    adapter_dir: Path | None,
    work_dir: Path | None,
    say: Log,
) -> tuple[float, Any]:
    """The ONNX export (the adapter merged, or separate as graph inputs): (seconds, the
    separate adapter's feeds or None)."""
    device, precision = parsed.target.device, parsed.target.precision
    with tempfile.TemporaryDirectory(prefix="graft-optimize-", dir=work_dir) as tmp:
        export_start = time.perf_counter()
        feeds = None
        if adapter_dir is not None and not inputs.separate:
            from graft_trainer.export.merge import merge_adapter

            say("merging the adapter into the base weights")
            source = merge_adapter(
                model_dir, Path(adapter_dir), Path(tmp) / "merged", inputs.adapter_field
            )
            say(f"exporting {precision} for {device}")
            builder.build(source, out_dir, precision=precision, device=device)
        elif inputs.separate:
            peft_adapter = inputs.peft_adapter
            assert peft_adapter is not None
            say(f"exporting {precision} for {device} with the adapter as graph inputs")
            graph = export_with_lora_inputs(
                model_dir, out_dir, precision, device, peft_adapter.target_modules, inputs.shapes
            )
            feeds = bundle.check_adapter(
                peft_adapter, graph, name="adapter", field=inputs.adapter_field
            )
            bundle.write_adapter_file(feeds, out_dir / ADAPTER_FILE, model_digest(model_dir))
        else:
            say(f"exporting {precision} for {device}")
            builder.build(model_dir, out_dir, precision=precision, device=device)
        return time.perf_counter() - export_start, feeds


def _optimize_validate(
    parsed: OptimizeJobSpec,
    inputs: _OptimizeInputs,
    metrics: OptimizeMetrics,
    model_dir: Path,
    out_dir: Path,
    adapter_dir: Path | None,
    feeds: Any,
    say: Log,
) -> list[Generation]:
    """Generations of the validate prompts, decode speed and PyTorch-vs-ONNX perplexity
    through onnxruntime-genai (into `metrics`)."""
    from graft_trainer.export import validate as checks

    say("validating with onnxruntime-genai")
    validate, texts = parsed.validate_, inputs.texts
    device, precision = parsed.target.device, parsed.target.precision
    adapters = {SEPARATE_ADAPTER_NAME: out_dir / ADAPTER_FILE} if inputs.separate else None
    active = SEPARATE_ADAPTER_NAME if inputs.separate else None
    genai = checks.GenaiModel(out_dir, adapters)
    results = [genai.generate(p, validate.max_new_tokens, adapter=active) for p in validate.prompts]
    smoke_prompt = (validate.prompts or texts or [SMOKE_PROMPT])[0]
    if not results:
        genai.generate(smoke_prompt, 4, adapter=active)
    metrics.decode_tokens_per_second = round(
        genai.decode_tokens_per_second(smoke_prompt, DECODE_TOKENS, adapter=active), 2
    )
    if texts and precision != "bf16":  # numpy has no bfloat16 for the KV cache feeds
        say("measuring perplexity: PyTorch vs ONNX")
        token_ids = checks.tokenize_texts(model_dir, texts)
        if token_ids:
            ppl_torch = checks.perplexity_torch(model_dir, token_ids, adapter_dir)
            ppl_onnx = checks.perplexity_onnx(out_dir, token_ids, feeds, device=device)
            metrics.perplexity_py_torch = round(ppl_torch, 6)
            metrics.perplexity_onnx = round(ppl_onnx, 6)
            metrics.perplexity_increase = round(checks.perplexity_increase(ppl_torch, ppl_onnx), 6)
    return _generations(results)


def _check_parity(
    parsed: OptimizeJobSpec, metrics: OptimizeMetrics, generations: list[Generation]
) -> None:
    """spec.validate.parity: the perplexity increase measured and within the limit."""
    parity, precision = parsed.validate_.parity, parsed.target.precision
    if parity is None:
        return
    limit = parity.max_perplexity_increase
    increase = metrics.perplexity_increase
    if increase is None:
        raise ExportError(
            "spec.validate.parity",
            f"perplexity parity is not measured for {precision} exports in this trainer",
            "ParityNotMeasured",
            details={"metrics": metrics.to_api(), "generations": generations},
        )
    if increase > limit:
        raise ExportError(
            "spec.validate.parity.maxPerplexityIncrease",
            f"the {precision} export's perplexity is {metrics.perplexity_onnx:.4f} against "
            f"{metrics.perplexity_py_torch:.4f} for PyTorch: an increase of {increase:.2%}, "
            f"above the allowed {limit:.2%}",
            "ParityExceeded",
            details={"metrics": metrics.to_api(), "generations": generations},
        )


# ---------------------------------------------------------------------------------------------
# AdapterBundle


@dataclass
class BundleAdapterInput:
    """One adapter of the bundle, resolved to a local PEFT directory.

    `base_model_digest`: the digest of the base model it was trained on (`baseModel.digest` of
    the FineTuneJob's adapter manifest; read from `path/manifest.json` when not given); it must
    equal the bundle base's digest (`manifest.model_digest`, the trainer's definition).
    """

    name: str
    path: Path
    base_model_digest: str | None = None


@dataclass
class BundleResult:
    out_dir: Path
    model_dir: Path
    adapter_files: dict[str, Path]
    reports: list[AdapterReport]
    base_decode_tokens_per_second: float
    manifest: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        return {"adapters": [r.to_api() for r in self.reports]}


@dataclass
class _BundleInputs:
    """What the AdapterBundle's pre-flight found: each checked adapter and its base digest."""

    index_of: dict[str, int]  # adapter name -> its index in spec.adapters
    base_digest: str
    shapes: Any  # bundle.base_linear_shapes(base_model_dir)
    peft: dict[str, bundle.PeftAdapter]
    digests: dict[str, str | None]  # the base model digest each adapter declares

    def field_of(self, name: str) -> str:
        return f"spec.adapters[{self.index_of[name]}]"


def run_bundle(
    spec: AdapterBundleSpec | Mapping[str, Any],
    *,
    base_model_dir: Path,
    adapters: Sequence[BundleAdapterInput],
    out_dir: Path,
    work_dir: Path | None = None,
    measure_overhead: bool = True,
    on_progress: Log | None = None,
) -> BundleResult:
    """Export the base once with LoRA inputs, write one .onnx_adapter per adapter, and check
    the compatibility contract. `adapters` follow `spec.adapters` by name (same order)."""
    say = on_progress or log.info
    parsed = _parse_spec(spec, AdapterBundleSpec)
    device, precision = parsed.target.device, parsed.target.precision
    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    inputs = _bundle_preflight(parsed, base_model_dir, adapters, out_dir)

    started = time.time()
    union = bundle.union_target_modules(inputs.peft.values())
    model_dir = out_dir / "model"
    say(f"exporting the {precision} base for {device} with LoRA inputs on {union}")
    export_start = time.perf_counter()
    graph = export_with_lora_inputs(
        base_model_dir, model_dir, precision, device, union, inputs.shapes
    )
    conversion_seconds = time.perf_counter() - export_start
    files, reports = _bundle_adapter_files(inputs, adapters, graph, out_dir)
    base_outputs, base_tps, ordered = _bundle_smoke_test(
        parsed, inputs, adapters, model_dir, files, reports, measure_overhead
    )

    bundle.save_graph_spec(graph, model_dir / "adapter_inputs.json")
    body = {
        "kind": "adapter-bundle",
        "producer": "AdapterBundle",
        "spec": parsed.to_api(),
        "target": {"device": device, "precision": precision},
        "baseModelDigest": inputs.base_digest,
        "model": "model/",
        "noAdapter": {"model": "model/", "filename": BASE_GRAPH, "overlay": NO_ADAPTER_OVERLAY},
        "adapterInputs": "model/adapter_inputs.json",
        "targetModules": union,
        "adapters": [
            {
                **reports[a.name].to_api(),
                "file": f"adapters/{a.name}.onnx_adapter",
                "declaredBaseModelDigest": inputs.digests.get(a.name),
                "ranks": dict(sorted(inputs.peft[a.name].ranks.items())),
            }
            for a in parsed.adapters
        ],
        "baseGenerations": [g.to_api() for g in _generations(base_outputs)],
        "baseDecodeTokensPerSecond": round(base_tps, 2),
        "conversionSeconds": round(conversion_seconds, 3),
        "libraries": library_versions(),
        "startTime": started,
        "endTime": time.time(),
    }
    manifest = write_manifest(out_dir, body)
    return BundleResult(
        out_dir=out_dir,
        model_dir=model_dir,
        adapter_files=files,
        reports=ordered,
        base_decode_tokens_per_second=base_tps,
        manifest=manifest,
    )


def _bundle_preflight(
    parsed: AdapterBundleSpec,
    base_model_dir: Path,
    adapters: Sequence[BundleAdapterInput],
    out_dir: Path,
) -> _BundleInputs:
    """Every cheap check, before the export: target, base model, each adapter (resolved, on
    this base, its modules servable), output directory."""
    device, precision = parsed.target.device, parsed.target.precision
    builder.check_target(device, precision)
    builder.preflight(base_model_dir, "spec.baseModel")
    index_of = {a.name: i for i, a in enumerate(parsed.adapters)}
    given = {a.name for a in adapters}
    for name, index in index_of.items():
        if name not in given:
            raise ExportError(f"spec.adapters[{index}]", f"adapter {name!r} was not resolved")
    base_digest = model_digest(base_model_dir)
    inputs = _BundleInputs(index_of, base_digest, bundle.base_linear_shapes(base_model_dir), {}, {})
    for item in adapters:
        if item.name not in index_of:
            raise ExportError("spec.adapters", f"adapter {item.name!r} is not in the spec")
        adapter_field = inputs.field_of(item.name)
        declared = item.base_model_digest or declared_base_digest(Path(item.path))
        if declared and not same_digest(declared, base_digest):
            raise ExportError(
                adapter_field,
                f"adapter {item.name!r} was trained on base model {short(declared)}, but the "
                f"bundle's base model is {short(base_digest)}; all adapters must share the "
                "base model",
                "BaseModelMismatch",
            )
        inputs.digests[item.name] = declared
        adapter = bundle.read_peft_adapter(Path(item.path), adapter_field)
        bundle.check_against_base(adapter, inputs.shapes, name=item.name, field=adapter_field)
        bundle.check_runtime_modules(adapter, name=item.name, field=adapter_field)
        inputs.peft[item.name] = adapter
    _check_device_runtime(device)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError("", f"output directory {out_dir} is not empty")
    return inputs


def _bundle_adapter_files(
    inputs: _BundleInputs,
    adapters: Sequence[BundleAdapterInput],
    graph: Any,
    out_dir: Path,
) -> tuple[dict[str, Path], dict[str, AdapterReport]]:
    """The contract: tensors by name, shape and dtype, in each .onnx_adapter as written."""
    from graft.storage.artifacts import file_digest

    files: dict[str, Path] = {}
    reports: dict[str, AdapterReport] = {}
    for item in adapters:
        adapter_field = inputs.field_of(item.name)
        adapter = inputs.peft[item.name]
        feeds = bundle.check_adapter(adapter, graph, name=item.name, field=adapter_field)
        path = bundle.write_adapter_file(
            feeds, out_dir / "adapters" / f"{item.name}.onnx_adapter", inputs.base_digest
        )
        bundle.verify_adapter_file(
            path, graph, bundle.graph_ranks(adapter, graph), name=item.name, field=adapter_field
        )
        files[item.name] = path
        reports[item.name] = AdapterReport(
            name=item.name,
            rank=adapter.rank,
            target_modules=adapter.target_modules,
            sha256=file_digest(path),
        )
    return files, reports


def _bundle_smoke_test(
    parsed: AdapterBundleSpec,
    inputs: _BundleInputs,
    adapters: Sequence[BundleAdapterInput],
    model_dir: Path,
    files: dict[str, Path],
    reports: dict[str, AdapterReport],
    measure_overhead: bool,
) -> tuple[list[Any], float, list[AdapterReport]]:
    """Each adapter through onnxruntime-genai, and its decode overhead over the plain base:
    (the base's generations, its decode tokens/s, the reports in spec order)."""
    from graft_trainer.export import validate as checks

    prompts = parsed.validate_.prompts or [SMOKE_PROMPT]
    max_new = parsed.validate_.max_new_tokens
    genai = checks.GenaiModel(model_dir, files)
    plain = checks.GenaiModel(model_dir, filename=BASE_GRAPH)
    base_outputs = [plain.generate(p, max_new) for p in prompts]
    base_tps = plain.decode_tokens_per_second(prompts[0], DECODE_TOKENS) if measure_overhead else 0
    failures = []
    for item in adapters:
        report = reports[item.name]
        try:
            results = [genai.generate(p, max_new, adapter=item.name) for p in prompts]
            if not any(r.tokens for r in results):
                raise RuntimeError("generated no tokens")
            report.smoke_test = "passed"
            if parsed.validate_.prompts:
                report.generations = _generations(results)
            if measure_overhead and base_tps:
                tps = genai.decode_tokens_per_second(prompts[0], DECODE_TOKENS, adapter=item.name)
                report.decode_overhead = round(base_tps / tps - 1.0, 4)
        except Exception as exc:
            report.smoke_test = "failed"
            failures.append((item.name, f"{type(exc).__name__}: {exc}"))
    ordered = [reports[a.name] for a in parsed.adapters if a.name in reports]
    if failures:
        name, why = failures[0]
        raise ExportError(
            inputs.field_of(name),
            f"adapter {name!r} failed its onnxruntime-genai smoke test: {why}",
            "SmokeTestFailed",
            details={"adapters": [r.to_api() for r in ordered]},
        )
    return base_outputs, base_tps, ordered


__all__ = [
    "BundleAdapterInput",
    "BundleResult",
    "ExportError",
    "OptimizeResult",
    "run_bundle",
    "run_optimize",
]
