"""Hyper-parameter search in the trainer: a FineTuneJob with `spec.search` runs a study.

Each trial is the same job with the trial's parameters (`graft.search_plan.trial_spec`), trained
by the normal `Engine` into `<prefix>/trials/<n>/` (its own adapter, metrics, report and
checkpoints). Intermediate evaluations are reported to optuna and a trial that falls behind is
pruned there (the Engine's `on_evaluate` hook stops it). Trials run one at a time in this
process, or up to `parallelism` at once in spawned processes that talk to the study here.

The study's records are written to `<prefix>/search/study.json` after every change and read
back on start: a rerun (a restarted pod) keeps every finished trial, continues the trial that
was running (from its own checkpoints) and asks only for the trials still missing. At the end
the best trial's adapter is copied to `<prefix>/adapter/`, a search report goes to
`<prefix>/report.html`, and the job's `manifest.json` is written last, holding the best trial's
spec and the study summary: whatever reads a finished FineTuneJob (`graft run` chains, the
operator) finds the best adapter where a plain job keeps its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal

from graft import search_plan as plan
from graft.api.finetune import FineTuneJobSpec, FineTuneProgress
from graft.api.search import SearchSpec
from graft.progress import ProgressEvent, Reporter
from graft.storage import (
    MANIFEST,
    StoreError,
    download_artifact,
    open_store,
    read_manifest,
    write_artifact,
)
from graft.storage.uri import join_uri
from graft_trainer.errors import (
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_OK,
    GraftInputError,
    one_line,
    store_exit_code,
)

log = logging.getLogger("graft_trainer.search")


class TrialPruned(Exception):
    """Raised from the Engine's evaluation hook: optuna pruned the trial at `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(f"pruned at step {step}")
        self.step = step


@dataclass
class TrialOutcome:
    """How one trial ended (plain data: it crosses the process boundary)."""

    state: Literal["Complete", "Pruned", "Failed"]
    value: float | None = None
    step: int | None = None
    adapter: str | None = None
    message: str | None = None
    input_error: bool = False
    store_error: bool = False


# ---------------------------------------------------------------- one trial


class _TrialReporter:
    """The job's reporter during an in-process trial: messages name the trial, and the trial's
    artifact URIs stay out of the job's status (the job's artifacts come at the end)."""

    def __init__(self, inner: Reporter, number: int, target: int) -> None:
        self.inner, self.label = inner, f"trial {number + 1} of {target}"

    def report(self, event: ProgressEvent) -> None:
        message = f"{self.label}: {event.message}" if event.message else ""
        with contextlib.suppress(Exception):
            self.inner.report(
                ProgressEvent(
                    stage=event.stage,
                    progress=event.progress,
                    metrics=event.metrics,
                    warnings=event.warnings,
                    message=message,
                )
            )

    def close(self) -> None:
        pass


def train_trial(
    spec_doc: dict[str, Any],
    identity: tuple[str, str, str],
    uri: str,
    metric: str,
    on_report: Any,
    reporter: Reporter | None = None,
    work_dir: Path | None = None,
) -> TrialOutcome:
    """Train one trial with the Engine. `on_report(step, value, last)` gets every intermediate
    objective value and returns True to prune the trial there."""
    from pydantic import ValidationError

    from graft_trainer.engine import Engine, JobIdentity
    from graft_trainer.reporting import NullReporter

    try:
        spec = FineTuneJobSpec.model_validate(spec_doc)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return TrialOutcome("Failed", message=f"{where}: {first['msg']}", input_error=True)
    last_step: list[int] = []

    def hook(step: int, total: int, values: dict[str, float]) -> None:
        value = values.get(metric)
        if value is None:
            return
        last_step.append(step)
        if on_report(step, float(value), step >= total):
            raise TrialPruned(step)

    engine = Engine(
        spec,
        JobIdentity(*identity),
        uri,
        reporter or NullReporter(),
        work_dir=work_dir,
        on_evaluate=hook,
        generate_during_eval=metric in ("accuracy", "f1", "bleu", "rouge"),
    )
    try:
        result = engine.run()
    except TrialPruned as exc:
        return TrialOutcome("Pruned", step=exc.step, message=str(exc))
    except GraftInputError as exc:
        return TrialOutcome(
            "Failed", step=_last(last_step), message=one_line(exc), input_error=True
        )
    except StoreError as exc:
        return TrialOutcome("Failed", message=one_line(exc), store_error=True)
    except Exception as exc:  # one trial's failure (say, out of memory) is not the study's
        log.exception("trial failed")
        return TrialOutcome(
            "Failed", step=_last(last_step), message=f"{type(exc).__name__}: {one_line(exc)}"
        )
    value = result.final.get(metric)
    adapter = result.artifacts.get("adapter") or result.artifacts.get("model")
    if value is None or not math.isfinite(value):
        return TrialOutcome(
            "Failed", step=result.final_step, adapter=adapter, message=f"{metric} is {value}"
        )
    return TrialOutcome("Complete", value=float(value), step=result.final_step, adapter=adapter)


def _last(steps: list[int]) -> int | None:
    return steps[-1] if steps else None


def _worker(conn: Connection, threads: int) -> None:
    """A spawned trial worker: trains the trials it is sent, one after another, with `threads`
    torch threads; intermediate values go to the study over `conn` and the answer (prune or
    not) comes back."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("graft_trainer").setLevel(logging.WARNING)

    def on_report(step: int, value: float, last: bool) -> bool:
        conn.send(("report", step, value, last))
        return bool(conn.recv())

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] != "trial":
            return
        _, spec_doc, identity, uri, metric, work_dir = message
        try:
            outcome = train_trial(
                spec_doc,
                identity,
                uri,
                metric,
                on_report,
                work_dir=Path(work_dir) if work_dir else None,
            )
        except Exception as exc:  # never leave the study waiting
            outcome = TrialOutcome("Failed", message=f"{type(exc).__name__}: {one_line(exc)}")
        conn.send(("done", outcome))


# ---------------------------------------------------------------- the study


class SearchRun:
    """One run of a job's study, from the stored records to the published best trial."""

    def __init__(
        self,
        document: dict[str, Any],
        spec: FineTuneJobSpec,
        artifacts_uri: str,
        reporter: Reporter,
        work_dir: Path | None = None,
    ) -> None:
        assert spec.search is not None
        self.spec = spec
        self.search: SearchSpec = spec.search
        self.base = spec.to_api()
        meta = document.get("metadata") or {}
        self.name = str(meta.get("name", "finetune"))
        self.namespace = str(meta.get("namespace") or "local")
        self.uid = str(meta.get("uid", ""))
        self.prefix = artifacts_uri if artifacts_uri.endswith("/") else artifacts_uri + "/"
        self.store = open_store(self.prefix)
        self.reporter = reporter
        self.work_dir = work_dir
        self.metric = self.search.objective.metric
        self.target = plan.target_trials(self.search)
        self.study = plan.new_study(self.base, self.search)
        self.ostudy: Any = None
        self.handles: dict[int, Any] = {}  # trial number -> optuna Trial
        self.all_input_errors = True  # every failed trial failed on its input

    # -------------------------------------------------------- records

    def load(self) -> None:
        text = self.store.read_bytes(plan.study_uri(self.prefix))
        self.study = plan.load_or_new(text, self.base, self.search)
        if text is not None and not self.study.trials:
            log.warning("starting a new study: the stored one was made by a different spec")
        self.ostudy = plan.rebuild_study(self.study, self.search, seed=self.spec.training.seed)

    def save(self) -> None:
        self.store.write_bytes(plan.study_uri(self.prefix), self.study.dumps().encode())

    def say(self, message: str) -> None:
        done = self.study.count(*plan.FINISHED)
        progress = FineTuneProgress(
            step=done, total_steps=self.target, percent=min(100, int(100 * done / self.target))
        )
        log.info(message)
        with contextlib.suppress(Exception):
            self.reporter.report(
                ProgressEvent(stage="training", progress=progress, message=message)
            )

    def publish_status(self) -> None:
        """status.search after every start and end of a trial, where the reporter can write
        it (on a cluster: the resource's status); a failure is logged, never fatal."""
        patch = getattr(self.reporter, "patch_status", None)
        if not callable(patch):
            return
        try:
            patch({"search": plan.summary(self.study).to_api()}, attempts=1)
        except Exception as exc:
            log.warning("could not record status.search: %s", exc)

    # -------------------------------------------------------- asking and telling

    def next_trial(self) -> tuple[Any, plan.StudyTrial] | None:
        """A trial to run: one left running by an earlier process first, then a new one."""
        for handle in plan.running_trials(self.ostudy):
            if handle.number not in self.handles:
                record = self.study.get(handle.number)
                self.handles[handle.number] = handle
                self.say(f"trial {handle.number}: continuing {record.params}")
                return handle, record
        if len(self.study.trials) >= self.target:
            return None
        handle = self.ostudy.ask()
        params = plan.suggest(handle, self.search)
        record = plan.start_record(self.study, handle, params, self.prefix)
        self.handles[handle.number] = handle
        self.save()
        self.publish_status()
        self.say(f"trial {handle.number}: starting {params}")
        return handle, record

    def trial_doc(self, record: plan.StudyTrial) -> dict[str, Any]:
        record.uri = record.uri or plan.trial_uri(self.prefix, record.number)
        return plan.trial_spec(self.base, record.params)

    def identity(self, record: plan.StudyTrial) -> tuple[str, str, str]:
        return (f"{self.name}-trial-{record.number}", self.namespace, self.uid)

    def report(self, record: plan.StudyTrial, step: int, value: float, last: bool) -> bool:
        """An intermediate objective value; True when the trial should stop here."""
        handle = self.handles[record.number]
        record.step = max(record.step or 0, step)
        if step not in record.intermediate:
            handle.report(value, step)
            plan.sync_record(record, self.ostudy)
            self.save()
        if last:
            return False
        return bool(handle.should_prune())

    def finish(self, record: plan.StudyTrial, outcome: TrialOutcome) -> None:
        from optuna.trial import TrialState

        handle = self.handles.pop(record.number)
        if outcome.state == "Complete":
            self.ostudy.tell(handle, outcome.value)
        elif outcome.state == "Pruned":
            self.ostudy.tell(handle, state=TrialState.PRUNED)
        else:
            self.ostudy.tell(handle, state=TrialState.FAIL)
        plan.sync_record(record, self.ostudy)
        if outcome.step is not None:
            record.step = outcome.step
        record.adapter = outcome.adapter if outcome.state == "Complete" else None
        record.message = outcome.message
        self.save()
        self.publish_status()
        if outcome.state == "Complete":
            detail = f"complete, {self.metric} {outcome.value:.4g}"
        elif outcome.state == "Pruned":
            last = record.reported
            detail = f"pruned at step {record.step}" + (
                f" ({self.metric} {last:.4g})" if last is not None else ""
            )
        else:
            detail = f"failed: {outcome.message}"
        self.say(f"trial {record.number}: {detail}")

    # -------------------------------------------------------- running

    def run(self) -> tuple[int, str]:
        self.store.check(self.prefix, write=True)
        self.load()
        if len(self.study.trials) < self.target or self.study.count("Running"):
            # the job's outputs are about to change: its manifest goes first
            self.store.delete([join_uri(self.prefix, MANIFEST)])
        parallel = min(self.search.parallelism, max(1, self.target))
        aborted = self.run_parallel(parallel) if parallel > 1 else self.run_sequential()
        if aborted is not None:
            return EXIT_FAILURE, aborted
        best = plan.best_trial(self.study)
        if best is None:
            failed = [t for t in self.study.trials if t.state == "Failed"]
            reason = f"; trial {failed[0].number}: {failed[0].message}" if failed else ""
            code = EXIT_INVALID if failed and self.all_input_errors else EXIT_FAILURE
            return code, f"no trial of the search completed{reason}"
        self.publish(best)
        s = plan.summary(self.study)
        return (
            EXIT_OK,
            f"search finished: {s.completed} complete, {s.pruned} pruned, {s.failed} failed; "
            f"best trial {best.number} ({self.metric} {best.value:.4g}, {best.params}); "
            f"outputs in {self.prefix}",
        )

    def _note(self, outcome: TrialOutcome) -> None:
        if outcome.state == "Failed" and not outcome.input_error:
            self.all_input_errors = False

    def _trial_dir(self, record: plan.StudyTrial) -> Path | None:
        if self.work_dir is None:
            return None
        path = self.work_dir / f"trial-{record.number}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_sequential(self) -> str | None:
        while (picked := self.next_trial()) is not None:
            _, record = picked
            doc = self.trial_doc(record)
            assert record.uri is not None
            outcome = train_trial(
                doc,
                self.identity(record),
                record.uri,
                self.metric,
                lambda step, value, last, r=record: self.report(r, step, value, last),
                reporter=_TrialReporter(self.reporter, record.number, self.target),
                work_dir=self._trial_dir(record),
            )
            if outcome.store_error:
                # the store, not the trial: leave it running, to be continued by a rerun
                self.handles.pop(record.number, None)
                return outcome.message
            self.finish(record, outcome)
            self._note(outcome)
        return None

    def run_parallel(self, parallel: int) -> str | None:
        """Up to `parallel` trials at once, each worker a spawned process that keeps running
        trials (one import of the ML stack per worker, not per trial)."""
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // parallel)
        workers: dict[Connection, Any] = {}  # our end -> process
        busy: dict[Connection, plan.StudyTrial] = {}
        aborted: str | None = None
        try:
            while True:
                while aborted is None and len(busy) < parallel:
                    picked = self.next_trial()
                    if picked is None:
                        break
                    _, record = picked
                    work = self._trial_dir(record)
                    doc = self.trial_doc(record)
                    job = ("trial", doc, self.identity(record), record.uri, self.metric)
                    job += (str(work) if work else None,)
                    for _attempt in range(2):
                        idle = [c for c in workers if c not in busy]
                        if idle:
                            conn = idle[0]
                        else:
                            conn, theirs = ctx.Pipe()
                            proc = ctx.Process(target=_worker, args=(theirs, threads), daemon=True)
                            proc.start()
                            theirs.close()
                            workers[conn] = proc
                        try:
                            conn.send(job)
                            break
                        except OSError:  # an idle worker that died: start another
                            workers.pop(conn).join(timeout=10)
                    else:
                        raise RuntimeError("cannot hand a trial to a worker process")
                    busy[conn] = record
                if not busy:
                    break
                for ready in wait(list(busy)):
                    assert isinstance(ready, Connection)
                    record = busy[ready]
                    try:
                        message = ready.recv()
                    except (EOFError, OSError):
                        proc = workers.pop(ready)
                        proc.join(timeout=30)
                        ready.close()
                        message = (
                            "done",
                            TrialOutcome(
                                "Failed", message=f"trial process exited ({proc.exitcode})"
                            ),
                        )
                    if message[0] == "report":
                        _, step, value, last = message
                        ready.send(self.report(record, step, value, last))
                        continue
                    outcome: TrialOutcome = message[1]
                    del busy[ready]
                    if outcome.store_error:
                        # the store, not the trial: leave it running, to be continued by a rerun
                        self.handles.pop(record.number, None)
                        aborted = aborted or outcome.message
                        continue
                    self.finish(record, outcome)
                    self._note(outcome)
        finally:
            for conn in workers:
                with contextlib.suppress(Exception):
                    conn.send(("stop",))
                    conn.close()
            for proc in workers.values():
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=10)
        return aborted

    # -------------------------------------------------------- the job's outputs

    def publish(self, best: plan.StudyTrial) -> None:
        """The best trial's weights become the job's; report, metrics and manifest (last)."""
        from graft_trainer.search_report import render_search_report

        assert best.uri is not None
        trial_manifest = read_manifest(best.uri, self.store)
        if trial_manifest is None:
            raise StoreError(f"{best.uri}: the best trial has no manifest")
        best_spec = trial_manifest.get("spec") or plan.trial_spec(self.base, best.params)
        kind = "model" if best_spec.get("method") == "full" else "adapter"
        status = plan.summary(self.study)
        job = {"name": self.name, "namespace": self.namespace, "uid": self.uid}
        search_info = {
            **status.to_api(),
            "strategy": self.search.strategy,
            "objective": self.search.objective.to_api(),
            "bestTrialUri": best.uri,
            "study": plan.study_uri(self.prefix),
        }
        self.store.delete([join_uri(self.prefix, MANIFEST)])
        tmp = tempfile.mkdtemp(prefix="graft-search-", dir=self.work_dir)
        try:
            out = Path(tmp) / "out"
            weights, weights_manifest = download_artifact(
                join_uri(best.uri, f"{kind}/"), out / kind, store=self.store
            )
            weights_manifest.pop("files", None)
            weights_uri = join_uri(self.prefix, f"{kind}/")
            write_artifact(
                weights,
                weights_uri,
                {**weights_manifest, "job": job, "searchTrial": best.number},
                store=self.store,
            )
            trial_metrics = self.store.read_bytes(join_uri(best.uri, "metrics.json"))
            metrics = {
                "search": search_info,
                "bestTrial": json.loads(trial_metrics) if trial_metrics else None,
            }
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
            (out / "report.html").write_text(
                render_search_report(self.name, self.search, self.study, best.number)
            )
            manifest = {k: v for k, v in trial_manifest.items() if k != "files"}
            manifest.update(
                {"job": job, "kind": "finetune-output", "spec": best_spec, "search": search_info}
            )
            write_artifact(out, self.prefix, manifest, store=self.store)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        artifacts = {
            kind: weights_uri,
            "report": join_uri(self.prefix, "report.html"),
            "metrics": join_uri(self.prefix, "metrics.json"),
            "tensorboard": join_uri(best.uri, "tensorboard/"),
            "checkpoints": join_uri(best.uri, "checkpoints/"),
        }
        progress = FineTuneProgress(step=self.target, total_steps=self.target, percent=100)
        with contextlib.suppress(Exception):
            self.reporter.report(
                ProgressEvent(
                    stage="done",
                    progress=progress,
                    message=f"best trial {best.number}: {self.metric} {best.value:.4g}",
                    artifacts=artifacts,
                )
            )
        patch = getattr(self.reporter, "patch_status", None)
        if callable(patch):  # status.search, where the reporter can write it
            try:
                patch({"search": status.to_api(), "artifacts": artifacts})
            except Exception as exc:
                log.warning("could not record status.search: %s", exc)


def run_search(
    document: dict[str, Any],
    artifacts_uri: str,
    reporter_name: str | None,
    work_dir: Path | None = None,
) -> tuple[int, str]:
    """Run the study of a FineTuneJob with `spec.search`; the contract of `run_object`:
    (0 success | 1 failure | 2 invalid input, one-line message)."""
    from graft.api.kinds import FineTuneJob, InvalidResource, parse_object
    from graft_trainer.reporting import make_reporter

    try:
        obj = parse_object(document)
    except InvalidResource as exc:
        return EXIT_INVALID, f"invalid resource: {exc}"
    if not isinstance(obj, FineTuneJob) or obj.spec.search is None:
        return EXIT_INVALID, "expected a FineTuneJob with spec.search"
    try:
        import optuna  # noqa: F401
    except ImportError:
        return EXIT_FAILURE, "spec.search needs optuna in the trainer image (pip install optuna)"
    reporter = make_reporter(reporter_name)
    try:
        return SearchRun(document, obj.spec, artifacts_uri, reporter, work_dir).run()
    except GraftInputError as exc:
        return EXIT_INVALID, one_line(exc)
    except StoreError as exc:
        return store_exit_code(exc), one_line(exc)
    finally:
        reporter.close()
