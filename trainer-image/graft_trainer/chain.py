"""`graft run` on a file of several resources: FineTuneJobs, then the OptimizeJobs and
AdapterBundles that reference them by name, in dependency order, all on this machine.

A reference (`spec.source.fineTuneJobRef.name`, `spec.adapters[i].fineTuneJobRef.name`) names a
FineTuneJob in the same file, or one already run to its default output (`prior(name)` finds its
manifest). Every reference is checked before anything runs, and so is the architecture of every
model an OptimizeJob or AdapterBundle will export: a FineTuneJob whose model the ONNX builder
cannot export is refused before it trains, not after. Each output is written with its
manifest last, to `spec.output.uri/<name>/` or `./graft-runs/<name>/` (the caller's `uri_for`).

Planned as the operator plans it: an OptimizeJob or AdapterBundle passes the operator's source
gate (`graft.controller.sources.gate`, which also picks a search's best trial) over the
FineTuneJobs that ran here, then runs from the references it resolved, as its pod does.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft_trainer.errors import (
    EXIT_INVALID,
    EXIT_OK,
    GraftInputError,
    one_line,
    store_exit_code,
)
from graft_trainer.outcome import RunEnd

Say = Callable[[str], None]
# Runs one FineTuneJob document: (document, artifacts URI, reporter) -> how it ended.
RunFineTune = Callable[[dict[str, Any], str, str | None], RunEnd]
FINETUNE = "FineTuneJob"
# The namespace the operator's gate is told about for resources run here (its messages).
LOCAL_NAMESPACE = "local"


class ChainError(GraftInputError):
    """A document set that cannot run: a dangling reference, a cycle, a disagreement."""


@dataclass
class Done:
    """A FineTuneJob that ran (or ran before): where its outputs are."""

    name: str
    uri: str
    spec: Any  # FineTuneJobSpec


def references(obj: Any) -> list[tuple[str, str]]:
    """(field, FineTuneJob name) of every reference `obj` makes: the operator's reading."""
    from graft.controller.sources import references as spec_references

    return [(r.field, r.name) for r in spec_references(obj.kind, obj.spec.to_api())]


def order(objs: Sequence[Any], source: str, prior: Callable[[str], str | None]) -> list[Any]:
    """The objects in dependency order (file order among independent ones)."""
    by_key: dict[tuple[str, str], Any] = {}
    for obj in objs:
        key = (obj.kind, obj.metadata.name)
        if key in by_key:
            raise ChainError(f"{obj.kind}/{obj.metadata.name}: appears twice in {source}")
        by_key[key] = obj
    deps: dict[int, set[int]] = {}
    index = {id(o): i for i, o in enumerate(objs)}
    for i, obj in enumerate(objs):
        deps[i] = set()
        for field_path, name in references(obj):
            target = by_key.get((FINETUNE, name))
            if target is not None:
                deps[i].add(index[id(target)])
            elif prior(name) is None:
                raise ChainError(
                    f"{obj.kind}/{obj.metadata.name}: {field_path}: no FineTuneJob {name!r} "
                    f"in {source} (and no finished run of it to reuse; a search is reused by "
                    "listing it again: its finished trials are not rerun)"
                )
    done: list[int] = []
    while len(done) < len(objs):
        ready = [i for i in range(len(objs)) if i not in done and deps[i] <= set(done)]
        if not ready:
            stuck = ", ".join(
                f"{objs[i].kind}/{objs[i].metadata.name}" for i in range(len(objs)) if i not in done
            )
            raise ChainError(f"reference cycle among {stuck} in {source}")
        done.append(ready[0])
    return [objs[i] for i in done]


def _local_dir(uri: str) -> Path:
    """A local directory for a model or adapter location (downloaded if remote)."""
    from graft.api.base import Location
    from graft_trainer.sources import fetch_model

    return fetch_model(Location(uri=uri))


def _weights_dir(job: Done, field_path: str) -> Path:
    from graft.storage import join_uri, read_manifest

    # Whether the job can serve here (an adapter, one base model) is the gate's to say; a
    # reader trusts only a manifest.
    if read_manifest(job.uri) is None:
        raise ChainError(
            f"{field_path}: FineTuneJob {job.name!r} has no finished output in {job.uri}"
        )
    return _local_dir(join_uri(job.uri, "adapter/"))


def _eval_texts(spec: Any) -> list[str] | None:
    """The FineTuneJob's eval split rendered with its textTemplate (None when not easy)."""
    if not spec.dataset.text_template or not spec.dataset.eval_split:
        return None
    try:
        from graft_trainer import data as D
        from graft_trainer.preflight import select_records
        from graft_trainer.sources import load_splits

        splits, _ = load_splits(spec.dataset)
        _, evals = select_records(spec, splits)
        texts = [D.render_template(spec.dataset.text_template, r, i) for i, r in enumerate(evals)]
    except Exception:
        return None
    return texts[:64] or None


def _publish(out_dir: Path, uri: str, manifest: dict[str, Any]) -> None:
    """Upload `out_dir` to `uri`, manifest last; a stale manifest there goes first."""
    from graft.storage import MANIFEST, local_path, write_artifact

    dest = local_path(uri)
    if dest is not None:
        (dest / MANIFEST).unlink(missing_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    write_artifact(out_dir, uri, manifest)


def _export_bases(obj: Any, specs: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, model URI) of the base model(s) an OptimizeJob or AdapterBundle will export;
    `specs` holds the FineTuneJob specs by name (a referenced job's base is its spec.model)."""
    spec = obj.spec
    if obj.kind == "OptimizeJob":
        ref = spec.source.fine_tune_job_ref
        if ref is not None:
            job = specs.get(ref.name)
            return [] if job is None else [("spec.source.fineTuneJobRef", job.model.uri)]
        return [("spec.source.model", spec.source.model.uri)]
    if obj.kind == "AdapterBundle":
        if spec.base_model is not None:
            return [("spec.baseModel", spec.base_model.uri)]
        for i, adapter in enumerate(spec.adapters):
            job = specs.get(adapter.fine_tune_job_ref.name) if adapter.fine_tune_job_ref else None
            if job is not None:
                return [(f"spec.adapters[{i}].fineTuneJobRef", job.model.uri)]
    return []


def _config_dir(uri: str) -> Path | None:
    """A local directory holding the model's config.json: the folder itself for a local
    model, else the download (cached; the FineTuneJob reads it from the cache). None when the
    model cannot be had: the job that needs it reports that."""
    from graft.storage import StoreError, local_path

    try:
        path = local_path(uri)
        if path is not None:
            return path if path.is_dir() else None
        return _local_dir(uri)
    except (GraftInputError, StoreError, OSError, ValueError):
        return None


def check_exportable(objs: Sequence[Any], specs: dict[str, Any]) -> None:
    """Refuse, before anything trains, an export whose base model's architecture the installed
    onnxruntime-genai model builder cannot export (ChainError naming the resource, the field,
    the architecture and the supported ones). Reads only config.json."""
    from graft_trainer.export import builder
    from graft_trainer.export.errors import ExportError

    for obj in objs:
        for field_path, uri in _export_bases(obj, specs):
            model_dir = _config_dir(uri)
            if model_dir is None or not (model_dir / "config.json").is_file():
                continue
            try:
                builder.preflight(model_dir, field_path)
            except ExportError as exc:
                refs = [name for _, name in references(obj)]
                trains = f" (the base model FineTuneJob {refs[0]!r} trains)" if refs else ""
                raise ChainError(
                    f"{obj.kind}/{obj.metadata.name}: {exc.field}{trains}: {exc.message}"
                ) from None


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def run_optimize_object(
    obj: Any, uri: str, jobs: dict[str, Done], say: Say
) -> tuple[list[str], dict[str, Any]]:
    """Export one OptimizeJob to `uri`; returns the lines to show and its status fields."""
    from graft_trainer.export.stages import run_optimize

    source = obj.spec.source
    eval_texts = None
    if source.fine_tune_job_ref is not None:
        job = jobs[source.fine_tune_job_ref.name]
        model_dir = _local_dir(job.spec.model.uri)
        if job.spec.method == "full":
            from graft.storage import join_uri

            model_dir, adapter_dir = _local_dir(join_uri(job.uri, "model/")), None
        else:
            adapter_dir = _weights_dir(job, "spec.source.fineTuneJobRef")
        eval_texts = _eval_texts(job.spec)
    else:
        model_dir = _local_dir(source.model.uri)
        adapter_dir = _local_dir(source.adapter.uri) if source.adapter else None
    with tempfile.TemporaryDirectory(prefix="graft-optimize-") as tmp:
        out_dir = Path(tmp) / "out"
        result = run_optimize(
            obj.spec,
            model_dir=model_dir,
            out_dir=out_dir,
            adapter_dir=adapter_dir,
            eval_texts=eval_texts,
            work_dir=Path(tmp),
            on_progress=say,
        )
        _publish(out_dir, uri, result.manifest)
    m = result.metrics
    lines = [
        f"OptimizeJob/{obj.metadata.name}: {obj.spec.target.precision} "
        f"{obj.spec.target.device} model in {uri}",
        f"  size {_num(m.size_bytes, ',.0f')} bytes, perplexity {_num(m.perplexity_py_torch)} "
        f"(PyTorch) -> {_num(m.perplexity_onnx)} (ONNX), "
        f"decode {_num(m.decode_tokens_per_second, ',.0f')} tokens/s",
    ]
    lines += [f"  {g.prompt!r} -> {g.output!r}" for g in result.generations]
    return lines, {"artifacts": {"model": uri}, **result.status()}


def run_bundle_object(
    obj: Any, uri: str, jobs: dict[str, Done], say: Say
) -> tuple[list[str], dict[str, Any]]:
    """Build one AdapterBundle in `uri`; returns the lines to show and its status fields."""
    from graft.storage import join_uri
    from graft_trainer.export.stages import BundleAdapterInput, run_bundle

    spec = obj.spec
    base_uri = spec.base_model.uri if spec.base_model is not None else None
    inputs: list[BundleAdapterInput] = []
    for i, adapter in enumerate(spec.adapters):
        if adapter.fine_tune_job_ref is None:
            inputs.append(BundleAdapterInput(adapter.name, _local_dir(adapter.uri)))
            continue
        job = jobs[adapter.fine_tune_job_ref.name]
        base_uri = base_uri or job.spec.model.uri  # the gate saw that they all share it
        inputs.append(BundleAdapterInput(adapter.name, _weights_dir(job, f"spec.adapters[{i}]")))
    assert base_uri is not None  # the API requires baseModel unless every adapter is a ref
    with tempfile.TemporaryDirectory(prefix="graft-bundle-") as tmp:
        out_dir = Path(tmp) / "out"
        result = run_bundle(
            spec,
            base_model_dir=_local_dir(base_uri),
            adapters=inputs,
            out_dir=out_dir,
            work_dir=Path(tmp),
            on_progress=say,
        )
        _publish(out_dir, uri, result.manifest)
        artifacts = {
            "model": join_uri(uri, result.model_dir.relative_to(out_dir).as_posix() + "/"),
            "adapters": {
                name: join_uri(uri, path.relative_to(out_dir).as_posix())
                for name, path in result.adapter_files.items()
            },
        }
    lines = [
        f"AdapterBundle/{obj.metadata.name}: {len(result.reports)} adapters on one "
        f"{spec.target.precision} {spec.target.device} base in {uri}"
    ]
    for r in result.reports:
        overhead = f"{r.decode_overhead:+.0%}" if r.decode_overhead is not None else "n/a"
        lines.append(
            f"  {r.name}: rank {r.rank}, smoke test {r.smoke_test}, decode overhead {overhead}"
        )
        lines += [f"    {g.prompt!r} -> {g.output!r}" for g in r.generations]
    return lines, {"artifacts": artifacts, **result.status()}


def run_referencing_document(
    document: dict[str, Any], obj: Any, artifacts_uri: str, say: Say
) -> tuple[list[str], dict[str, Any]]:
    """Run an OptimizeJob or AdapterBundle in a pod: its FineTuneJob references were resolved
    by the operator at launch (`references` in resource.json: artifact prefix and spec)."""
    from pydantic import ValidationError

    from graft.api.finetune import FineTuneJobSpec

    jobs: dict[str, Done] = {}
    resolved = document.get("references") or {}
    for field_path, name in references(obj):
        entry = resolved.get(name)
        if not isinstance(entry, dict) or "uri" not in entry:
            raise ChainError(f"{field_path}: FineTuneJob {name!r} was not resolved at launch")
        try:
            spec = FineTuneJobSpec.model_validate(entry.get("spec") or {})
        except ValidationError as exc:
            raise ChainError(f"{field_path}: FineTuneJob {name!r}: {exc}") from None
        jobs[name] = Done(name, str(entry["uri"]), spec)
    if obj.kind == "OptimizeJob":
        return run_optimize_object(obj, artifacts_uri, jobs, say)
    return run_bundle_object(obj, artifacts_uri, jobs, say)


def _finished(name: str, spec: dict[str, Any], uri: str, search: Any = None) -> dict[str, Any]:
    """A FineTuneJob that ran here, as the operator's gate reads one from the cluster: its spec
    (writing where it wrote), Succeeded, and a study's status.search."""
    status: dict[str, Any] = {"conditions": [{"type": "Succeeded", "status": "True"}]}
    if search is not None:
        status["search"] = search
    spec = {**spec, "output": {**(spec.get("output") or {}), "uri": uri}}
    return {"metadata": {"name": name, "uid": ""}, "spec": spec, "status": status}


def run_documents(
    documents: Sequence[dict[str, Any]],
    *,
    source: str,
    uri_for: Callable[[dict[str, Any]], str],
    prior: Callable[[str], str | None],
    reporter: str | None,
    say: Say,
    run_finetune: RunFineTune,
) -> tuple[int, str]:
    """Run every document in dependency order; returns (exit code, one-line message).
    `run_finetune` runs each FineTuneJob (the pod's `run_resource`); an OptimizeJob or
    AdapterBundle goes through the operator's source gate, then runs as its pod would, from
    the references the gate resolved."""
    from graft.api.finetune import FineTuneJobSpec
    from graft.api.kinds import InvalidResource, parse_object
    from graft.controller.config import OperatorConfig
    from graft.controller.sources import gate
    from graft.storage import StoreError, read_manifest

    objs: list[Any] = []
    raw: dict[int, dict[str, Any]] = {}
    for doc in documents:
        try:
            obj = parse_object(doc)
        except InvalidResource as exc:
            return EXIT_INVALID, f"invalid resource: {exc}"
        raw[id(obj)] = doc
        objs.append(obj)
    try:
        ordered = order(objs, source, prior)
    except ChainError as exc:
        return EXIT_INVALID, one_line(exc)
    in_file = {o.metadata.name for o in objs if o.kind == FINETUNE}
    found: dict[str, dict[str, Any]] = {}  # the FineTuneJobs that ran, as the gate reads them
    prefixes: dict[str, str] = {}  # where each wrote its outputs
    for obj in objs:
        for _, name in references(obj):
            prior_uri = prior(name)
            if name not in in_file and prior_uri is not None:
                spec = (read_manifest(prior_uri) or {}).get("spec", {})
                found[name], prefixes[name] = _finished(name, spec, prior_uri), prior_uri
    specs = {name: FineTuneJobSpec.model_validate(job["spec"]) for name, job in found.items()}
    specs.update({o.metadata.name: o.spec for o in objs if o.kind == FINETUNE})
    try:
        check_exportable(ordered, specs)
    except ChainError as exc:
        return EXIT_INVALID, one_line(exc)
    for obj in ordered:
        doc, uri = raw[id(obj)], uri_for(raw[id(obj)])
        name, label = obj.metadata.name, f"{obj.kind}/{obj.metadata.name}"
        if obj.kind == FINETUNE:
            end = run_finetune(doc, uri, reporter)
            if end.code != EXIT_OK:
                return end.code, f"{label}: {end.message}"
            found[name] = _finished(name, obj.spec.to_api(), uri, end.search)
            prefixes[name] = uri
            say(f"{label}: {end.message}")
            continue
        if obj.kind not in ("OptimizeJob", "AdapterBundle"):
            return EXIT_INVALID, f"{label}: {obj.kind} is not supported by graft run"
        sources = gate(
            obj.kind, LOCAL_NAMESPACE, obj.spec.to_api(), found, OperatorConfig(), prefixes.get
        )
        if sources.state != "ready":
            return EXIT_INVALID, f"{label}: {sources.message}"
        try:
            lines, _ = run_referencing_document(
                {**doc, "references": sources.references}, obj, uri, say
            )
        except GraftInputError as exc:
            text = one_line(exc)
            return EXIT_INVALID, text if text.startswith(label) else f"{label}: {text}"
        except StoreError as exc:
            return store_exit_code(exc), f"{label}: {one_line(exc)}"
        for line in lines:
            say(line)
    return EXIT_OK, f"{len(ordered)} resources finished"
