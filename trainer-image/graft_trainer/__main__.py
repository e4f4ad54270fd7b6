"""`graft-trainer`: the trainer pod's entry point.

    graft-trainer run-resource PATH    PATH holds the whole resource (FineTuneJob, OptimizeJob
                                       or AdapterBundle) as JSON, as the operator launched it
    graft-trainer preflight-resource PATH
                                       the checks of a GPU FineTuneJob that need no GPU, in the
                                       CPU pod the operator runs before the GPU pod

Environment: GRAFT_ARTIFACTS_URI (the artifact prefix), GRAFT_REPORTER (rich | jsonl |
kubernetes), AWS_* for S3, HF_TOKEN for hf://, GRAFT_TRAINER_METRICS_PORT (a Prometheus
endpoint while it runs, graft_trainer.observability; unset or 0: none), GRAFT_ALLOCATOR (auto |
tcmalloc | system: the malloc it restarts itself under, graft_trainer.allocator). A multi-node job's
pods also get GRAFT_NODES, GRAFT_NODE_RANK, GRAFT_RENDEZVOUS_ADDR and GRAFT_RENDEZVOUS_PORT
(graft_trainer.parallel). Exit codes: 0 success, 2 invalid input (not worth retrying), 3
untrusted storage, 4 a training process in another pod was lost, 143 stopped on SIGTERM after a
checkpoint, 1 any other failure; on failure a one-line reason goes to /dev/termination-log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graft.contract import ENV_ARTIFACTS_URI, ENV_REPORTER, ENV_TRIAL
from graft.exit_codes import EXIT_PREEMPTED
from graft_trainer import outcome, parallel
from graft_trainer.errors import (
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_OK,
    GraftInputError,
    one_line,
    store_exit_code,
)
from graft_trainer.outcome import RunEnd

log = logging.getLogger("graft_trainer")


def run_object(
    document: dict[str, Any],
    artifacts_uri: str,
    reporter_name: str | None,
    work_dir: Path | None = None,
    local_nodes: bool = False,
) -> tuple[int, str]:
    """Validate and run one resource object; returns (exit code, one-line message)."""
    end = run_resource(document, artifacts_uri, reporter_name, work_dir, local_nodes=local_nodes)
    return end.code, end.message


def run_resource(
    document: dict[str, Any],
    artifacts_uri: str,
    reporter_name: str | None,
    work_dir: Path | None = None,
    local_nodes: bool = False,
) -> RunEnd:
    """Validate and run one resource object; how it ended, with the outcome for the operator.
    `local_nodes` (`graft run`): a multi-node FineTuneJob runs every node's processes here;
    in a pod, GRAFT_NODES and the other multi-node variables say which are this pod's."""
    from graft.api.kinds import FineTuneJob, InvalidResource, parse_object

    # `references`: what the operator resolved at launch, beside the object, not part of it.
    try:
        obj = parse_object({k: v for k, v in document.items() if k != "references"})
    except InvalidResource as exc:
        return outcome.failed(document, EXIT_INVALID, f"invalid resource: {exc}")
    from graft_trainer import observability

    if not isinstance(obj, FineTuneJob):
        observability.serve_from_env()  # CPU, memory and GPU while it exports
        return run_export(document, obj, artifacts_uri)
    if obj.spec.search is not None:  # `graft run`: on a cluster each trial's pod serves its own
        from graft_trainer.search import run_search

        return run_search(document, obj.spec, artifacts_uri, reporter_name, work_dir=work_dir)
    try:
        count = parallel.processes(obj.spec)
        topo = parallel.topology(obj.spec, count, local=local_nodes)
    except GraftInputError as exc:
        return outcome.failed(document, EXIT_INVALID, one_line(exc))
    # several processes, here or across pods (even one per pod): this process launches its
    # share of them; rank 0 serves the metrics, not the launcher
    if topo.world > 1 and not parallel.in_worker():
        return parallel.run_data_parallel(
            document, artifacts_uri, reporter_name, count, work_dir=work_dir, topo=topo
        )
    if parallel.rank() == 0:
        observability.serve_from_env()
    return run_finetune(document, obj, artifacts_uri, reporter_name, work_dir)


def run_finetune(
    document: dict[str, Any],
    obj: Any,
    artifacts_uri: str,
    reporter_name: str | None,
    work_dir: Path | None,
) -> RunEnd:
    """One training process of a FineTuneJob; its outcome carries the last event's fields."""
    from graft.storage import StoreError
    from graft_trainer import observability
    from graft_trainer.engine import Engine, JobIdentity
    from graft_trainer.preemption import Preempted
    from graft_trainer.reporting import make_reporter

    meta = obj.metadata
    extra = meta.model_extra or {}
    identity = JobIdentity(meta.name, meta.namespace or "local", str(extra.get("uid", "")))
    reporter = outcome.LastEventReporter(observability.observed(make_reporter(reporter_name)))
    try:
        result = Engine(obj.spec, identity, artifacts_uri, reporter, work_dir=work_dir).run()
    except Preempted as exc:
        return outcome.failed(document, EXIT_PREEMPTED, str(exc))
    except GraftInputError as exc:
        return outcome.failed(document, EXIT_INVALID, one_line(exc))
    except StoreError as exc:
        return outcome.failed(document, store_exit_code(exc), one_line(exc))
    finally:
        reporter.close()
    published = result.artifacts.get("published")
    message = f"finished at step {result.final_step}; outputs in {artifacts_uri}" + (
        f"; published {published}" if published else ""
    )
    fields = outcome.event_fields(reporter.last)
    fields["artifacts"] = {**fields.get("artifacts", {}), **result.artifacts}
    return outcome.succeeded(document, message, fields)


def run_export(document: dict[str, Any], obj: Any, artifacts_uri: str) -> RunEnd:
    """An OptimizeJob or AdapterBundle: export, validate, publish; the outcome carries the
    status fields (artifacts, metrics, generations, adapter reports)."""
    from graft.storage import StoreError
    from graft_trainer.chain import run_referencing_document
    from graft_trainer.export.errors import ExportError

    try:
        lines, status = run_referencing_document(document, obj, artifacts_uri, log.info)
    except ExportError as exc:  # its reason becomes the resource's (ParityExceeded, ...)
        return outcome.failed(document, EXIT_INVALID, one_line(exc), exc.reason)
    except GraftInputError as exc:
        return outcome.failed(document, EXIT_INVALID, one_line(exc))
    except StoreError as exc:
        return outcome.failed(document, store_exit_code(exc), one_line(exc))
    for line in lines:
        log.info("%s", line)
    return outcome.succeeded(document, f"{obj.kind} finished; outputs in {artifacts_uri}", status)


def check_for_gpu_pod(document: dict[str, Any], artifacts_uri: str) -> tuple[int, str]:
    """The operator's pre-flight pod: every check that needs no GPU (data, model, tokenizer,
    targets, memory estimate), run in a CPU pod before the FineTuneJob's GPU pod is created.
    Commits of hf:// sources are pinned beside the artifacts, so the GPU pod reads the bytes
    that were checked. Writes no status: the operator reads the outcome from the pod."""
    from graft.api.kinds import FineTuneJob, InvalidResource, parse_object
    from graft.storage import StoreError, join_uri, open_store
    from graft_trainer.hub import PINS_FILE, RevisionPins
    from graft_trainer.preflight import gpu_pod_summary, prepare

    try:
        obj = parse_object({k: v for k, v in document.items() if k != "references"})
    except InvalidResource as exc:
        return EXIT_INVALID, f"invalid resource: {exc}"
    if not isinstance(obj, FineTuneJob):
        return EXIT_INVALID, f"{obj.kind} has no pre-flight pod (only FineTuneJobs do)"
    try:
        store = open_store(artifacts_uri)
        store.check(artifacts_uri, write=True)
        pins = RevisionPins.load(join_uri(artifacts_uri, PINS_FILE), store)
        prep = prepare(obj.spec, pins, for_gpu_pod=True)
        pins.save()
    except GraftInputError as exc:
        return EXIT_INVALID, one_line(exc)
    except StoreError as exc:
        return store_exit_code(exc), one_line(exc)
    return EXIT_OK, gpu_pod_summary(obj.spec, prep)


def _cmd_check_for_gpu_pod(args: argparse.Namespace) -> int:
    artifacts = os.environ.get("GRAFT_ARTIFACTS_URI", "")
    try:
        document = json.loads(Path(args.path).read_text())
        code, message = check_for_gpu_pod(document, artifacts)
    except (OSError, ValueError) as exc:
        code, message = EXIT_INVALID, f"cannot read {args.path}: {one_line(exc)}"
    except Exception as exc:  # the reason, never a traceback with secrets, ends the pod
        log.exception("pre-flight failed")
        code, message = EXIT_FAILURE, f"{type(exc).__name__}: {one_line(exc)}"
    print(message if code == EXIT_OK else f"error: {message}", file=sys.stderr)
    # Success writes the findings too: the operator shows them in the Validated condition.
    outcome.write_termination_log(message)
    return code


def _cmd_run_resource(args: argparse.Namespace) -> int:
    artifacts = os.environ.get(ENV_ARTIFACTS_URI)
    document: dict[str, Any] | None = None
    if not artifacts:
        msg = f"{ENV_ARTIFACTS_URI} is not set (expected the artifact prefix to write under)"
        end = outcome.failed(None, EXIT_INVALID, msg)
    else:
        try:
            document = json.loads(Path(args.path).read_text())
        except (OSError, ValueError) as exc:
            msg = f"cannot read {args.path}: {one_line(exc)} (expected a Graft resource as JSON)"
            end = outcome.failed(None, EXIT_INVALID, msg)
        else:
            end = _run_document(document, artifacts)
    print(end.message if end.code == EXIT_OK else f"error: {end.message}", file=sys.stderr)
    outcome.write_termination_log(outcome.termination_message(end))
    # a multi-node job's outcome is node 0's: the other pods leave none beside the artifacts
    if document is not None and parallel.reports_outcome():
        outcome.save_outcome(end, _outcome_prefix(artifacts or ""))
    return end.code


def _outcome_prefix(artifacts: str) -> str:
    """Where the pod's outcome goes: beside its own artifacts (a trial's under its prefix)."""
    from graft.search_plan import trial_uri

    trial = os.environ.get(ENV_TRIAL)
    return (
        trial_uri(artifacts, int(trial)) if artifacts and trial and trial.isdigit() else artifacts
    )


def _run_document(document: dict[str, Any], artifacts: str) -> RunEnd:
    """The pod's run: one trial of the resource's study (GRAFT_TRIAL) or the resource."""
    trial = os.environ.get(ENV_TRIAL)
    try:
        if trial is None:
            return run_resource(document, artifacts, os.environ.get(ENV_REPORTER, "jsonl"))
        from graft_trainer.search_trial import run_trial

        if not trial.isdigit():
            msg = f"{ENV_TRIAL}={trial!r} is not a trial number"
            return outcome.failed(document, EXIT_INVALID, msg)
        code, message, result = run_trial(document, artifacts, int(trial))
        if code != EXIT_OK or result is None:
            return outcome.failed(document, code, message)
        return outcome.trial_finished(document, message, result)
    except Exception as exc:  # the reason, never a traceback with secrets, ends the pod
        log.exception("training failed")
        return outcome.failed(document, EXIT_FAILURE, f"{type(exc).__name__}: {one_line(exc)}")


def main(argv: Sequence[str] | None = None) -> int:
    """The `graft-trainer` command. Started as a process (argv None), it first restarts itself
    under the preferred malloc (graft_trainer.allocator)."""
    from graft_trainer.allocator import AllocatorChoiceError, restart_with_preferred_allocator
    from graft_trainer.reporting import setup_logging

    if argv is None:
        try:
            restart_with_preferred_allocator()
        except AllocatorChoiceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            outcome.write_termination_log(str(exc))
            return EXIT_INVALID

    parser = argparse.ArgumentParser(prog="graft-trainer", description="The Graft trainer.")
    parser.add_argument(
        "--log-format", choices=["text", "json"], default=os.environ.get("GRAFT_LOG_FORMAT", "json")
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rr = sub.add_parser("run-resource", help="run a resource object (JSON file) in the pod")
    rr.add_argument("path")
    rr.set_defaults(handler=_cmd_run_resource)
    pf = sub.add_parser(
        "preflight-resource",
        help="check a FineTuneJob's data and model in a CPU pod before its GPU pod is created",
    )
    pf.add_argument("path")
    pf.set_defaults(handler=_cmd_check_for_gpu_pod)
    args = parser.parse_args(argv)
    setup_logging(json_lines=args.log_format == "json")
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
