"""`graft run` of a FineTuneJob with `spec.search`: the operator's study, run on this machine.

One search engine, two executors. The plan is the operator's (`graft.controller.study.
plan_records`): which trial numbers start now (at most `parallelism` at once, lowest first),
and when the study is done and with which best trial. Each trial runs exactly as in its pod
(`graft_trainer.search_trial.run_trial`: its parameters from optuna and the other trials'
records, pruning, its record and the study report), here in a worker process instead of a Job.
So a study run here and one run on a cluster leave the same keys under the job's prefix
(`trials/<n>/...`, `search/report.html`), and the job's result is the same: the best trial's
outputs, which is what an OptimizeJob or AdapterBundle referencing the job uses.

A rerun continues the study: a trial whose record says it finished is reported without
training again, and one left running continues with its parameters from its checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from graft.api.finetune import FineTuneJobSpec, FineTuneProgress
from graft.contract import decode_termination
from graft.controller.study import StudyPlan, plan_records, reported_record
from graft.progress import ProgressEvent, Reporter
from graft.search_plan import trial_uri
from graft_trainer import outcome
from graft_trainer.errors import EXIT_FAILURE, EXIT_INVALID, EXIT_OK, one_line
from graft_trainer.outcome import RunEnd

log = logging.getLogger("graft_trainer.search")

# How often a trial whose process died starts again (a trial Job's retries, here).
TRIAL_RETRIES = 1
# A trial's result as its pod would end: (exit code, one line, its record for the operator).
TrialResult = tuple[int, str, dict[str, Any]]


def _init_worker(threads: int) -> None:
    """A spawned trial worker shares the cores with the others."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("graft_trainer").setLevel(logging.WARNING)


def _run_trial(document: dict[str, Any], prefix: str, number: int, work: str | None) -> TrialResult:
    from graft_trainer.search_trial import run_trial

    return run_trial(document, prefix, number, Path(work) if work else None)


class LocalStudy:
    """The study of one FineTuneJob, planned as the operator plans it, each trial a process."""

    def __init__(
        self,
        document: dict[str, Any],
        prefix: str,
        reporter: Reporter,
        work_dir: Path | None = None,
    ) -> None:
        self.document = document
        self.spec = document["spec"]
        self.name = str((document.get("metadata") or {}).get("name", "finetune"))
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.reporter = reporter
        self.work_dir = work_dir
        self.records: dict[int, dict[str, Any]] = {}

    def plan(self) -> StudyPlan:
        return plan_records(self.spec, self.prefix, self.records, self.name)

    def say(self, plan: StudyPlan, message: str) -> None:
        log.info(message)
        with contextlib.suppress(Exception):
            progress = FineTuneProgress.model_validate(plan.progress)
            self.reporter.report(
                ProgressEvent(stage="training", progress=progress, message=message)
            )

    def start(self, plan: StudyPlan, number: int) -> str | None:
        """Record trial `number` as running and say so (the plan it starts in); its work
        folder, if any."""
        self.records[number] = {"number": number, "state": "Running"}
        self.say(plan, f"trial {number}: started")
        if self.work_dir is None:
            return None
        path = self.work_dir / f"trial-{number}"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def finish(self, number: int, result: TrialResult) -> str | None:
        """Record how trial `number` ended; the reason to stop the whole run, if any."""
        code, message, record = result
        if code == EXIT_FAILURE:  # the store failed, not the trial: a rerun continues it
            return f"trial {number}: {message}"
        if code == EXIT_OK:
            end = outcome.trial_finished(self.document, message, record)
            # read as the operator reads the pod's termination message
            said = decode_termination(outcome.termination_message(end), "FineTuneJob")
            self.records[number] = reported_record(number, said)
        else:  # as a trial pod that exits 2: not retried, the trial failed
            end = outcome.failed(self.document, code, message)
            self.records[number] = {"number": number, "state": "Failed", "message": message}
        outcome.save_outcome(end, trial_uri(self.prefix, number))  # as the trial's pod does
        done = self.records[number]
        detail = done["state"] + (f": {done['message']}" if done.get("message") else "")
        self.say(self.plan(), f"trial {number}: {detail}")
        return None

    def run(self, parallel: int) -> tuple[StudyPlan, str | None]:
        """Run trials until the plan says the study is done; (last plan, abort reason)."""
        if parallel <= 1:
            return self._run_here()
        threads = max(1, (os.cpu_count() or 1) // parallel)
        context = multiprocessing.get_context("spawn")
        running: dict[concurrent.futures.Future[TrialResult], int] = {}
        lost: dict[int, int] = {}  # trial -> processes it lost
        aborted: str | None = None
        pool = ProcessPoolExecutor(
            parallel, mp_context=context, initializer=_init_worker, initargs=(threads,)
        )
        try:
            while True:
                plan = self.plan()
                for number in plan.launch if aborted is None else []:
                    work = self.start(plan, number)
                    future = pool.submit(_run_trial, self.document, self.prefix, number, work)
                    running[future] = number
                if not running:
                    return plan, aborted
                done, _ = concurrent.futures.wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    number = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        # A worker died (say, killed for memory) and took the pool with it:
                        # its trials start again in a new pool, as a lost pod's trial does,
                        # and a trial that loses a second process fails.
                        lost[number] = lost.get(number, 0) + 1
                        if lost[number] <= TRIAL_RETRIES:
                            del self.records[number]
                            continue
                        result = (EXIT_INVALID, "the trial's process died twice", {})
                    except Exception as exc:  # what the trial's pod would end with
                        result = (EXIT_INVALID, f"{type(exc).__name__}: {one_line(exc)}", {})
                    aborted = aborted or self.finish(number, result)
                if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = ProcessPoolExecutor(
                        parallel, mp_context=context, initializer=_init_worker, initargs=(threads,)
                    )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_here(self) -> tuple[StudyPlan, str | None]:
        """One trial at a time, in this process (no second import of the ML stack)."""
        while True:
            plan = self.plan()
            if not plan.launch:
                return plan, None
            number = plan.launch[0]
            work = self.start(plan, number)
            aborted = self.finish(number, _run_trial(self.document, self.prefix, number, work))
            if aborted is not None:
                return self.plan(), aborted


def study_end(document: dict[str, Any], plan: StudyPlan, prefix: str) -> RunEnd:
    """How the run ends, as the operator's status would say it; `search` carries the study's
    status.search (what a referencing resource's gate reads)."""
    if plan.outcome == "succeeded":
        message = f"search finished: {plan.message}; outputs in {prefix}"
        fields = {"artifacts": plan.artifacts, "progress": plan.progress}
        end = outcome.succeeded(document, message, fields)
    else:  # the operator's AllTrialsFailed, which names the first failed trial's cause
        end = outcome.failed(document, EXIT_FAILURE, f"the search failed: {plan.message}")
    end.search = plan.search
    return end


def run_search(
    document: dict[str, Any],
    spec: FineTuneJobSpec,
    artifacts_uri: str,
    reporter_name: str | None,
    work_dir: Path | None = None,
) -> RunEnd:
    """Run the study of the FineTuneJob `document` (validated: `spec`, with `search`) under
    `artifacts_uri`. Reached through `graft_trainer.__main__.run_resource`."""
    from graft_trainer.reporting import make_reporter

    assert spec.search is not None
    try:
        import optuna  # noqa: F401
    except ImportError:
        message = "spec.search needs optuna in the trainer image (pip install optuna)"
        return outcome.failed(document, EXIT_FAILURE, message)
    # The operator plans with the validated spec, defaults written out.
    planned = {**document, "spec": spec.to_api()}
    reporter = make_reporter(reporter_name)
    try:
        study = LocalStudy(planned, artifacts_uri, reporter, work_dir)
        plan, aborted = study.run(spec.search.parallelism)
    finally:
        reporter.close()
    if aborted is not None:
        return outcome.failed(document, EXIT_FAILURE, aborted)
    return study_end(planned, plan, study.prefix)
