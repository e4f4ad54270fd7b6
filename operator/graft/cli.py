"""The `graft` command line: CRDs, validation, docs and the operator; local runs and pre-flight
checks come from the trainer package (graft_trainer.cli) where it is installed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from rich.console import Console

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMANDS_GROUP = "graft.commands"  # entry points: callables adding subcommands to the parser


def _cmd_crds(args: argparse.Namespace, out: Console) -> int:
    from graft.crdgen import crd_files, stale_crds, write_crds

    directory = Path(args.out)
    if args.check:
        stale = stale_crds(directory)
        if stale:
            out.print(f"[red]out of date in {directory}:[/] {', '.join(stale)} (run `graft crds`)")
            return 1
        out.print(f"{directory}: up to date")
        return 0
    if args.stdout:
        sys.stdout.write("---\n".join(crd_files().values()))
        return 0
    for path in write_crds(directory):
        out.print(f"wrote {path}")
    return 0


def _cmd_docs(args: argparse.Namespace, out: Console) -> int:
    from graft.apidoc import render_api_reference

    path = Path(args.out)
    text = render_api_reference()
    if args.check:
        if not path.exists() or path.read_text() != text:
            out.print(f"[red]{path} is out of date[/] (run `graft docs`)")
            return 1
        out.print(f"{path}: up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    out.print(f"wrote {path}")
    return 0


def _cmd_validate(args: argparse.Namespace, out: Console) -> int:
    import yaml

    from graft.manifests import check_file
    from graft.policy import PlatformPolicy, default_output, parse_policy, policy_issues

    policy: PlatformPolicy | None = None
    if args.policy:
        try:
            policy = parse_policy(yaml.safe_load(Path(args.policy).read_text()))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            out.print(f"error: policy {args.policy}: {exc}", markup=False, highlight=False)
            return 2
    failed = False
    for name in args.files:
        objects, problems = check_file(Path(name))
        lines = [str(problem) for problem in problems]
        if policy is not None and not problems:
            for obj in objects:
                namespace = args.namespace or obj.metadata.namespace
                spec = obj.spec.to_api()
                tenant = default_output(policy, namespace or "")
                if "output" not in spec and tenant is not None:
                    spec["output"] = {"uri": tenant.uri}
                lines += [
                    f"{name}: {obj.kind}/{obj.metadata.name}: {issue} [PolicyDenied]"
                    for issue in policy_issues(spec, namespace, policy)
                ]
        for line in lines:
            out.print(line, markup=False, highlight=False)
        if lines:
            failed = True
        else:
            names = ", ".join(f"{o.kind}/{o.metadata.name}" for o in objects)
            out.print(f"{name}: ok ({names})", markup=False, highlight=False)
    return 1 if failed else 0


def _cmd_operator(args: argparse.Namespace, out: Console) -> int:
    from graft.controller.main import main as operator_main  # kopf only loads here

    return operator_main(args.operator_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graft", description="Fine-tuning of small language models on Kubernetes."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    crds = commands.add_parser("crds", help="generate the CRDs from the API models")
    crds.add_argument("--out", default=str(REPO_ROOT / "crds"), help="directory (default: crds/)")
    crds.add_argument("--check", action="store_true", help="fail if the files are out of date")
    crds.add_argument("--stdout", action="store_true", help="print instead of writing files")
    crds.set_defaults(handler=_cmd_crds)

    docs = commands.add_parser("docs", help="generate the API reference from the models")
    docs.add_argument("--out", default=str(REPO_ROOT / "docs" / "api.md"))
    docs.add_argument("--check", action="store_true", help="fail if the file is out of date")
    docs.set_defaults(handler=_cmd_docs)

    validate = commands.add_parser("validate", help="validate YAML files of Graft objects offline")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument(
        "--policy",
        metavar="POLICY",
        help="also check each object against a platform policy (YAML/JSON, the chart's `policy` "
        "values)",
    )
    validate.add_argument(
        "--namespace", help="the namespace the objects go to (for per-namespace policy rules)"
    )
    validate.set_defaults(handler=_cmd_validate)

    operator = commands.add_parser(
        "operator",
        help="run the operator (GRAFT_* environment; see graft.controller.config)",
        add_help=False,
    )
    operator.add_argument("operator_args", nargs=argparse.REMAINDER)
    operator.set_defaults(handler=_cmd_operator)

    # `run`, `preflight`, `testkit` and `generate` need the ML stack: the trainer package adds
    # them where it is installed (entry point group graft.commands); the operator image has
    # neither.
    for entry in entry_points(group=COMMANDS_GROUP):
        try:
            register = entry.load()
        except ImportError:
            continue
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `graft` command; `argv` None means this process was started as the command (a
    command may then restart it, as `graft run` does under the trainer's preferred malloc)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["operator"]:  # its own flags, parsed by graft.controller.main
        from graft.controller.main import main as operator_main

        return operator_main(words[1:])
    args = build_parser().parse_args(words)
    args.own_process = argv is None
    out = Console(soft_wrap=True)
    code: int = args.handler(args, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
