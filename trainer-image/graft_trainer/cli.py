"""The `graft` subcommands that need the trainer's world (torch, transformers): `run`,
`preflight`, `testkit` and `generate`. Registered into `graft` through the `graft.commands` entry point, so
the operator image, which has no trainer package, offers only what it can run."""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any

from rich.console import Console


def _local_uri(value: object, base: Path) -> object:
    """A plain relative or absolute path in a local spec becomes a file:// URI."""
    if isinstance(value, str) and "://" not in value:
        slash = "/" if value.endswith("/") else ""
        return "file://" + str((base / value).resolve()) + slash
    return value


def resolve_local_paths(document: Any, base: Path) -> Any:
    """Resolve the plain paths of model, dataset, output, baseModel, source.model/adapter and
    adapters[].uri against the YAML file's folder."""
    if not isinstance(document, dict) or not isinstance(document.get("spec"), dict):
        return document
    spec = document["spec"]
    source = spec.get("source") if isinstance(spec.get("source"), dict) else {}
    locations = [spec.get(k) for k in ("model", "dataset", "output", "baseModel")]
    locations += [source.get("model"), source.get("adapter")]
    adapters = spec.get("adapters")
    locations += adapters if isinstance(adapters, list) else []
    for loc in locations:
        if isinstance(loc, dict) and "uri" in loc:
            loc["uri"] = _local_uri(loc["uri"], base)
    return document


def _load_documents(path: Path, out: Console) -> list[Any] | None:
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        out.print(f"error: cannot read {path}: {str(exc).splitlines()[0]}", markup=False)
        return None
    if not docs:
        out.print(f"error: {path} holds no YAML document", markup=False)
        return None
    return [resolve_local_paths(d, path.resolve().parent) for d in docs]


def _artifacts_uri(document: dict[str, Any], override: str | None) -> str:
    name = str(document.get("metadata", {}).get("name", "run"))
    if override:
        return str(_local_uri(override.rstrip("/") + "/", Path.cwd()))
    output = document.get("spec", {}).get("output") or {}
    if isinstance(output, dict) and output.get("uri"):
        return str(output["uri"]).rstrip("/") + f"/{name}/"
    return str(_local_uri(f"graft-runs/{name}/", Path.cwd()))


RUN_KINDS = ("FineTuneJob", "OptimizeJob", "AdapterBundle")


def _cmd_run(args: argparse.Namespace, out: Console) -> int:
    docs = _load_documents(Path(args.file), out)
    if docs is None:
        return 2
    for doc in docs:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if kind not in RUN_KINDS:
            out.print(
                f"error: {kind or 'a document without kind'} is not yet supported by graft run "
                f"(expected {', '.join(RUN_KINDS)})",
                markup=False,
            )
            return 2
    from graft_trainer.allocator import AllocatorChoiceError, restart_with_preferred_allocator
    from graft_trainer.reporting import setup_logging

    if getattr(args, "own_process", False):
        try:
            restart_with_preferred_allocator()  # tcmalloc: a lower peak RSS (allocator.py)
        except AllocatorChoiceError as exc:
            out.print(f"error: {exc}", markup=False)
            return 2
    setup_logging(json_lines=args.log_format == "json", level=logging.WARNING)
    say = functools.partial(out.print, markup=False, highlight=False)
    if len(docs) == 1 and docs[0].get("kind") == "FineTuneJob":
        from graft_trainer.__main__ import run_object

        # a multi-node spec (resources.nodes) runs every node's processes here
        uri = _artifacts_uri(docs[0], args.out)
        code, message = run_object(docs[0], uri, args.reporter, local_nodes=True)
        say(f"error: {message}" if code else message)
        return int(code)
    from graft.storage import read_manifest
    from graft_trainer.__main__ import run_resource
    from graft_trainer.chain import run_documents

    # several documents: --out is the parent of one folder per resource
    override = args.out.rstrip("/") + "/" if args.out and len(docs) > 1 else None

    def uri_for(doc: dict[str, Any]) -> str:
        if override:
            name = str(doc.get("metadata", {}).get("name", "run"))
            return str(_local_uri(override + name + "/", Path.cwd()))
        return _artifacts_uri(doc, args.out)

    def prior(name: str) -> str | None:
        uri = uri_for({"metadata": {"name": name}})
        manifest = read_manifest(uri)
        return uri if manifest and manifest.get("kind") == "finetune-output" else None

    code, message = run_documents(
        docs,
        source=args.file,
        uri_for=uri_for,
        prior=prior,
        reporter=args.reporter,
        say=say,
        run_finetune=functools.partial(run_resource, local_nodes=True),
    )
    say(f"error: {message}" if code else message)
    return int(code)


def _cmd_preflight(args: argparse.Namespace, out: Console) -> int:
    docs = _load_documents(Path(args.file), out)
    if docs is None:
        return 2
    from graft.api.kinds import FineTuneJob, InvalidResource, parse_object
    from graft.storage import StoreError
    from graft_trainer.errors import GraftInputError
    from graft_trainer.preflight import prepare

    failed = 0
    for doc in docs:
        try:
            obj = parse_object(doc)
        except InvalidResource as exc:
            out.print(f"error: invalid resource: {exc}", markup=False)
            return 2
        if not isinstance(obj, FineTuneJob):
            out.print(f"error: {obj.kind} is not yet supported by graft preflight", markup=False)
            return 2
        try:
            prep = prepare(obj.spec)
        except GraftInputError as exc:
            out.print(f"error: {obj.metadata.name}: {exc}", markup=False, highlight=False)
            failed = failed or 2
            continue
        except StoreError as exc:
            out.print(f"error: {obj.metadata.name}: {exc}", markup=False, highlight=False)
            failed = failed or 1
            continue
        mem = prep.memory
        out.print(
            f"{obj.metadata.name}: ok: {len(prep.train_records)} train / "
            f"{len(prep.eval_records)} eval records; {prep.config.model_type} with "
            f"{mem['parameters']:,} parameters on {prep.device} ({prep.precision}); "
            f"targets {', '.join(prep.targets) or 'all weights'}; estimated peak memory "
            f"{mem['estimatedBytes'] / 2**30:.2f} GiB",
            markup=False,
            highlight=False,
        )
        for warning in prep.warnings:
            out.print(f"warning: {warning}", markup=False, highlight=False)
    return failed


def _cmd_testkit(args: argparse.Namespace, out: Console) -> int:
    from graft_trainer.testkit import build_kit

    paths = build_kit(Path(args.dir), n=args.records, seed=args.seed)
    for name, path in paths.items():
        out.print(f"{name}: {path}", markup=False, highlight=False)
    return 0


def _cmd_generate(args: argparse.Namespace, out: Console) -> int:
    from graft_trainer.generate import run_command

    return run_command(args)


def register(commands: Any) -> None:
    """Add the trainer's subcommands to `graft`'s subparsers."""
    run = commands.add_parser(
        "run",
        help="run a FineTuneJob, or a chain of FineTuneJobs, OptimizeJobs and AdapterBundles "
        "that reference each other, locally (no cluster needed)",
    )
    run.add_argument("file", metavar="FILE")
    run.add_argument(
        "--out",
        help="artifact directory or URI (default: spec.output.uri/<name>/ or ./graft-runs/<name>/);"
        " with several documents, the parent of one <name>/ folder each",
    )
    run.add_argument("--reporter", choices=["rich", "jsonl", "none"], default="rich")
    run.add_argument("--log-format", choices=["text", "json"], default="text")
    run.set_defaults(handler=_cmd_run)

    preflight = commands.add_parser("preflight", help="check data, model and memory of a job")
    preflight.add_argument("file", metavar="FILE")
    preflight.set_defaults(handler=_cmd_preflight)

    testkit = commands.add_parser("testkit", help="build the tiny model and phrase->tone data")
    testkit.add_argument("dir", metavar="DIR")
    testkit.add_argument("--records", type=int, default=300)
    testkit.add_argument("--seed", type=int, default=0)
    testkit.set_defaults(handler=_cmd_testkit)

    from graft_trainer.generate import add_arguments

    generate = commands.add_parser(
        "generate",
        help="run prompts through an AdapterBundle, an exported ONNX model, a PEFT adapter or a "
        "model (local folders and store URIs), streaming the tokens",
    )
    add_arguments(generate)
    generate.set_defaults(handler=_cmd_generate)
