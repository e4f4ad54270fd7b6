"""One trial of a study in its own pod: how the operator runs `spec.search` on a cluster.

The operator launches trial Jobs numbered 0..N-1 (at most `parallelism` at once) and learns
each result from the pod's termination message; it needs neither optuna nor the store. The pod
(`GRAFT_TRIAL=<n>`) does the study work against the output store:

- its parameters: read back from its own record `<prefix>/trials/<n>/trial.json` when a pod of
  this trial ran before (a lost pod's replacement continues the same trial), else asked from
  optuna with the finished trials' records as history (random and TPE with a seed per trial,
  so trials asked at the same time differ; a grid takes its n-th point, so parallel trials
  never collide);
- pruning: each intermediate value goes to an optuna study holding the finished trials, and
  the trial stops when the pruner says so (a pruned trial is a successful pod);
- its record is rewritten after every evaluation and at the end, and the study report
  (`<prefix>/search/report.html`) is redrawn from every record the pod can see.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from graft import search_plan as plan
from graft.api.finetune import FineTuneJobSpec
from graft.api.search import SearchSpec
from graft.progress import Reporter
from graft.storage import StoreError, open_store
from graft.storage.uri import join_uri
from graft_trainer.errors import EXIT_FAILURE, EXIT_INVALID, EXIT_OK, GraftInputError, one_line

log = logging.getLogger("graft_trainer.search")

RECORD = "trial.json"
REDRAWS = 5


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
    store_error: bool = False


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
        return TrialOutcome("Failed", message=f"{where}: {first['msg']}")
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
        return TrialOutcome("Failed", step=_last(last_step), message=one_line(exc))
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


def record_uri(prefix: str, number: int) -> str:
    return join_uri(plan.trial_uri(prefix, number), RECORD)


def grid_point(search: SearchSpec, number: int, seed: int) -> dict[str, Any]:
    """The grid's `number`-th point, in an order shuffled once by `seed`."""
    paths = list(search.space)
    points = list(itertools.product(*(search.space[p].candidates() for p in paths)))
    random.Random(seed).shuffle(points)
    return dict(zip(paths, points[number % len(points)], strict=True))


def _history(
    records: list[plan.StudyTrial], base: dict[str, Any], search: SearchSpec
) -> plan.Study:
    """A study of the finished records, renumbered 0..k-1 as `rebuild_study` expects."""
    study = plan.new_study(base, search)
    for i, record in enumerate(r for r in records if r.state in plan.FINISHED):
        study.trials.append(plan.StudyTrial.from_json({**record.to_json(), "number": i}))
    return study


def ask(
    records: list[plan.StudyTrial],
    base: dict[str, Any],
    search: SearchSpec,
    number: int,
    seed: int,
) -> dict[str, Any]:
    """Trial `number`'s parameters given the other trials' records."""
    if search.strategy == "grid":
        return grid_point(search, number, seed)
    ostudy = plan.rebuild_study(_history(records, base, search), search, seed=seed + 7919 * number)
    return plan.suggest(ostudy.ask(), search)


def _read_record(store: Any, prefix: str, number: int, study: str) -> plan.StudyTrial | None:
    """Trial `number`'s record, when it is one of the study `study` (a fingerprint): a record
    left by a run of another spec under the same prefix (`graft run` after an edit) is not."""
    data = store.read_bytes(record_uri(prefix, number))
    if data is None:
        return None
    try:
        record = plan.StudyTrial.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring the unreadable record of trial %d", number)
        return None
    if record.study != study:
        log.warning("trial %d: its record was made for another spec; it runs again", number)
        return None
    return record


def run_trial(
    document: dict[str, Any], prefix: str, number: int, work_dir: Path | None = None
) -> tuple[int, str, dict[str, Any]]:
    """Run trial `number` of the FineTuneJob `document` (with `spec.search`) under `prefix`.

    Returns (exit code, one-line message, the trial's result for the termination message).
    Exit 0 for any trial outcome (Complete, Pruned, Failed: the study goes on); 1 when the store
    fails (the pod is retried and continues); 2 when the document itself is unusable.
    """
    from graft.api.kinds import FineTuneJob, InvalidResource, parse_object

    try:
        obj = parse_object(document)
    except InvalidResource as exc:
        return EXIT_INVALID, f"invalid resource: {exc}", {}
    if not isinstance(obj, FineTuneJob) or obj.spec.search is None:
        return EXIT_INVALID, "expected a FineTuneJob with spec.search", {}
    search = obj.spec.search
    target = plan.target_trials(search)
    if not 0 <= number < target:
        return EXIT_INVALID, f"GRAFT_TRIAL={number} is outside the study's 0..{target - 1}", {}
    base = obj.spec.to_api()
    seed = obj.spec.training.seed
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    meta = obj.metadata
    identity = (
        f"{meta.name}-trial-{number}",
        meta.namespace or "local",
        str((meta.model_extra or {}).get("uid", "")),
    )
    try:
        store = open_store(prefix)
        study = plan.study_fingerprint(base)
        others = [
            r for n in range(target) if n != number if (r := _read_record(store, prefix, n, study))
        ]
        own = _read_record(store, prefix, number, study)
        if own is not None and own.state in plan.FINISHED:
            # The pod that finished it did not live to report it: report, do not rerun.
            return EXIT_OK, f"trial {number}: {own.state} (recorded before)", _result(own)
        if own is None:
            params = ask(others, base, search, number, seed)
            own = plan.StudyTrial(
                number=number,
                params=params,
                uri=plan.trial_uri(prefix, number),
                started=plan.now(),
                study=study,
            )
            store.write_bytes(record_uri(prefix, number), json.dumps(own.to_json()).encode())
        history = _history(others, base, search)
        history.trials.append(
            plan.StudyTrial.from_json({**own.to_json(), "number": len(history.trials)})
        )
        ostudy = plan.rebuild_study(history, search, seed=seed)
        (handle,) = plan.running_trials(ostudy)
        log.info("trial %d of %d: %s", number, target, own.params)

        def on_report(step: int, value: float, last: bool) -> bool:
            own.intermediate[step] = value
            own.step = max(own.step or 0, step)
            handle.report(value, step)
            store.write_bytes(record_uri(prefix, number), json.dumps(own.to_json()).encode())
            return not last and bool(handle.should_prune())

        outcome = train_trial(
            plan.trial_spec(base, own.params),
            identity,
            plan.trial_uri(prefix, number),
            search.objective.metric,
            on_report,
            reporter=_metrics_reporter(),
            work_dir=work_dir,
        )
        if outcome.store_error:
            return EXIT_FAILURE, outcome.message or "the output store failed", {}
        own.state = outcome.state
        own.value = outcome.value
        own.step = outcome.step if outcome.step is not None else own.step
        own.adapter = outcome.adapter if outcome.state == "Complete" else None
        own.message = outcome.message
        own.finished = plan.now()
        store.write_bytes(record_uri(prefix, number), json.dumps(own.to_json()).encode())
        _redraw_report(store, prefix, meta.name, search, target, study)
    except StoreError as exc:
        return EXIT_FAILURE, str(exc).splitlines()[0], {}
    return EXIT_OK, f"trial {number}: {own.state}", _result(own)


def _metrics_reporter() -> Any:
    """The trial pod's progress into its metrics endpoint, when it serves one (its status is
    the operator's: trials report through their termination message)."""
    from graft_trainer import observability
    from graft_trainer.reporting import NullReporter

    observability.serve_from_env()
    return observability.observed(NullReporter())


def _result(record: plan.StudyTrial) -> dict[str, Any]:
    """What the operator reads from the pod's termination message (at most 4 KiB)."""
    return {
        "trial": record.number,
        "state": record.state,
        "value": record.value,
        "step": record.step,
        "params": record.params,
        "adapter": record.adapter,
        "message": (record.message or "")[:300] or None,
    }


def _redraw_report(
    store: Any, prefix: str, name: str, search: SearchSpec, target: int, study: str
) -> None:
    """The study report from every record of the study `study` (its fingerprint) the store
    holds now.

    Trials finishing at the same time race to write the one report. Each redraws until the
    finished trials it drew are still all there are after its write, so whichever writes last
    drew every trial finished before it: the final report is whole.
    """
    from graft_trainer.search_report import render_search_report

    drawn: set[int] | None = None
    for _ in range(REDRAWS):
        trials = [r for n in range(target) if (r := _read_record(store, prefix, n, study))]
        finished = {t.number for t in trials if t.state in plan.FINISHED}
        if finished == drawn:
            return
        drawing = plan.Study(
            study, search.objective.direction, search.objective.metric, trials=trials
        )
        best = plan.best_trial(drawing)
        try:
            page = render_search_report(name, search, drawing, best.number if best else None)
            store.write_bytes(plan.report_uri(prefix), page.encode())
        except Exception as exc:  # the report is a view; the records are what counts
            log.warning("could not draw the search report: %s", exc)
            return
        drawn = finished
