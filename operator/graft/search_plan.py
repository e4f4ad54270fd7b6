"""Hyper-parameter search, the pure part: trial specs, optuna samplers and pruners, the study as
plain JSON records, and the status summary.

Shared by the trainer (which runs a study) and the operator (which reads a study's records to
fill `status.search`). No torch here, and optuna only inside the functions that need it: the
operator imports this module without optuna ever being loaded.

Each trial keeps its own record, `<prefix>/trials/<n>/trial.json` (graft_trainer.search_trial).
`rebuild_study` adds records back into a fresh in-memory optuna study (finished ones as
finished, the trial being run as RUNNING), so a trial asks its parameters with the finished
trials as history, and a trial whose process died continues with the same parameters
(`running_trials`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from graft.api.finetune import DEFAULT_EVAL_METRICS, GENERATION_METRICS
from graft.api.search import (
    DEFAULT_OBJECTIVE_METRIC,
    SearchBest,
    SearchSpec,
    SearchStatus,
    TrialRecord,
)
from graft.api.search import apply_params as _apply_params
from graft.storage.uri import join_uri

if TYPE_CHECKING:
    import optuna

TrialState = Literal["Running", "Complete", "Pruned", "Failed"]
FINISHED: tuple[TrialState, ...] = ("Complete", "Pruned", "Failed")
REPORT_FILE = "search/report.html"
# Spec sections whose change makes earlier trials incomparable (a new study starts).
COMPARED_SECTIONS = (
    "model",
    "dataset",
    "method",
    "lora",
    "quantization",
    "training",
    "evaluation",
)
# Search settings that may change between runs of the same study: more trials extend it.
FREE_SEARCH_FIELDS = ("trials", "parallelism")


# ---------------------------------------------------------------- locations and trial specs


def trial_uri(prefix: str, number: int) -> str:
    """The artifact prefix of trial `number`: `<prefix>/trials/<number>/`."""
    return join_uri(prefix, f"trials/{number}/")


def report_uri(prefix: str) -> str:
    """The study report every trial redraws: `<prefix>/search/report.html`."""
    return join_uri(prefix, REPORT_FILE)


def trial_spec(
    base: dict[str, Any], params: dict[str, Any], output_uri: str | None = None
) -> dict[str, Any]:
    """A trial's FineTuneJob spec (camelCase) from the job's spec and the trial's parameters.

    `search` is removed, every dotted path in `params` is set, and the objective metric is added
    to `evaluation.metrics` when it is a generated metric the job does not compute yet. With
    `output_uri` the trial writes there (`spec.output.uri`, other output fields kept).
    """
    search = base.get("search") or {}
    spec = _apply_params({k: v for k, v in base.items() if k != "search"}, params)
    metric = (search.get("objective") or {}).get("metric", DEFAULT_OBJECTIVE_METRIC)
    if metric in GENERATION_METRICS:
        evaluation = spec.setdefault("evaluation", {})
        metrics = list(evaluation.get("metrics") or DEFAULT_EVAL_METRICS)
        if metric not in metrics:
            evaluation["metrics"] = [*metrics, metric]
    if output_uri is not None:
        spec["output"] = {**(spec.get("output") or {}), "uri": output_uri}
    return spec


def study_fingerprint(base: dict[str, Any]) -> str:
    """What must match for earlier trials to belong to the same study (sha256 hex)."""
    search = {k: v for k, v in (base.get("search") or {}).items() if k not in FREE_SEARCH_FIELDS}
    keep = {k: base.get(k) for k in COMPARED_SECTIONS}
    body = json.dumps({"spec": keep, "search": search}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def grid_size(search: SearchSpec) -> int:
    size = 1
    for param in search.space.values():
        size *= len(param.candidates())
    return size


def target_trials(search: SearchSpec) -> int:
    """How many trials the study has when done: `trials`, or the grid's size when smaller."""
    if search.strategy == "grid":
        return min(search.trials, grid_size(search))
    return search.trials


# ---------------------------------------------------------------- optuna: space, sampler, pruner


def distributions(search: SearchSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """The optuna distribution of every searched path (a grid searches its candidates)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for path, param in search.space.items():
        if search.strategy == "grid" or param.type == "choice":
            values = param.candidates() if search.strategy == "grid" else list(param.values or [])
            out[path] = CategoricalDistribution(values)
            continue
        assert param.low is not None and param.high is not None
        if param.type == "int":
            int_step = 1 if param.log else max(1, int(param.step or 1))
            out[path] = IntDistribution(
                int(param.low), int(param.high), log=param.log, step=int_step
            )
        else:
            float_step = None if param.log else param.step
            out[path] = FloatDistribution(param.low, param.high, log=param.log, step=float_step)
    return out


def suggest(trial: optuna.trial.BaseTrial, search: SearchSpec) -> dict[str, Any]:
    """The trial's parameters, sampled (or read back) through optuna, by dotted path."""
    return {path: _suggest_one(trial, path, dist) for path, dist in distributions(search).items()}


def _suggest_one(
    trial: optuna.trial.BaseTrial, path: str, dist: optuna.distributions.BaseDistribution
) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(path, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(path, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(path, dist.low, dist.high, step=dist.step, log=dist.log)


def make_sampler(search: SearchSpec, seed: int = 0) -> optuna.samplers.BaseSampler:
    """random: RandomSampler; grid: GridSampler over every `candidates()`; tpe: TPESampler."""
    import optuna

    if search.strategy == "grid":
        space = {path: param.candidates() for path, param in search.space.items()}
        return _grid_sampler_class()(space, seed=seed)
    if search.strategy == "tpe":
        startup = max(1, min(10, search.trials // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=seed)


@functools.cache
def _grid_sampler_class() -> type[optuna.samplers.GridSampler]:
    """GridSampler for ask/tell: its `after_trial` calls `study.stop()`, which raises outside
    `study.optimize`; the caller stops after `target_trials` instead."""
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        def after_trial(self, *args: Any, **kwargs: Any) -> None:
            return None

    return AskTellGridSampler


def startup_trials(search: SearchSpec) -> int:
    """Finished trials before median pruning starts: 5 (optuna's default), fewer in small studies."""
    return max(1, min(5, search.trials // 5))


def make_pruner(search: SearchSpec) -> optuna.pruners.BasePruner:
    """median: MedianPruner (warmupSteps as n_warmup_steps); successive_halving:
    SuccessiveHalvingPruner (warmupSteps as min_resource); disabled: NopPruner."""
    import optuna

    pruning = search.pruning
    if not pruning.enabled:
        return optuna.pruners.NopPruner()
    if pruning.rule == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=pruning.warmup_steps or "auto", reduction_factor=3
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=startup_trials(search),
        n_warmup_steps=pruning.warmup_steps,
        interval_steps=1,
    )


# ---------------------------------------------------------------- the study as JSON records


def now() -> str:
    """A record's timestamp (RFC 3339, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(value: Any) -> Any:
    """`value` if it survives JSON, else its str (optuna system attrs are plain in practice)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


@dataclass
class StudyTrial:
    """One trial's record, `<prefix>/trials/<n>/trial.json` (`study`: the fingerprint of the
    spec it was run for; a record of another spec is not this study's)."""

    number: int
    params: dict[str, Any]
    state: TrialState = "Running"
    value: float | None = None
    intermediate: dict[int, float] = field(default_factory=dict)
    step: int | None = None
    uri: str | None = None
    adapter: str | None = None
    message: str | None = None
    started: str | None = None
    finished: str | None = None
    system_attrs: dict[str, Any] = field(default_factory=dict)
    study: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "number": self.number,
            "state": self.state,
            "params": self.params,
            "value": self.value if _finite(self.value) else None,
            "intermediate": {
                str(k): v for k, v in sorted(self.intermediate.items()) if math.isfinite(v)
            },
            "step": self.step,
            "uri": self.uri,
            "adapter": self.adapter,
            "message": self.message,
            "started": self.started,
            "finished": self.finished,
            "systemAttrs": {k: _plain(v) for k, v in self.system_attrs.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyTrial:
        state = data.get("state", "Running")
        if state not in ("Running", *FINISHED):
            raise ValueError(f"trial {data.get('number')}: unknown state {state!r}")
        return cls(
            number=int(data["number"]),
            params=dict(data.get("params") or {}),
            state=state,
            value=None if data.get("value") is None else float(data["value"]),
            intermediate={int(k): float(v) for k, v in (data.get("intermediate") or {}).items()},
            step=data.get("step"),
            uri=data.get("uri"),
            adapter=data.get("adapter"),
            message=data.get("message"),
            started=data.get("started"),
            finished=data.get("finished"),
            system_attrs=dict(data.get("systemAttrs") or {}),
            study=str(data.get("study") or ""),
        )

    @property
    def reported(self) -> float | None:
        """The last finite intermediate value (what a pruned trial reached)."""
        finite = [s for s, v in self.intermediate.items() if math.isfinite(v)]
        return self.intermediate[max(finite)] if finite else None


@dataclass
class Study:
    """The records of one study and what they belong to."""

    fingerprint: str
    direction: Literal["minimize", "maximize"] = "minimize"
    metric: str = "eval_loss"
    trials: list[StudyTrial] = field(default_factory=list)

    def get(self, number: int) -> StudyTrial:
        return self.trials[number]

    def count(self, *states: TrialState) -> int:
        return sum(1 for t in self.trials if t.state in states)


def new_study(base: dict[str, Any], search: SearchSpec) -> Study:
    return Study(
        fingerprint=study_fingerprint(base),
        direction=search.objective.direction,
        metric=search.objective.metric,
    )


# ---------------------------------------------------------------- records <-> optuna


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def rebuild_study(study: Study, search: SearchSpec, seed: int = 0) -> optuna.Study:
    """A fresh in-memory optuna study holding every record, in number order.

    Trial numbers in optuna equal the record numbers. A random or TPE sampler's seed is offset
    by the number of records, so a resumed study does not propose the same points again.
    """
    import optuna
    from optuna.trial import TrialState as OS

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = search.objective.direction
    # A grid's order comes from the seed (grid ids name points of the shuffled grid): it keeps
    # the seed. Random and TPE take a new seed per resume.
    offset = 0 if search.strategy == "grid" else len(study.trials)
    ostudy = optuna.create_study(
        direction=direction,
        sampler=make_sampler(search, seed + offset),
        pruner=make_pruner(search),
    )
    dists = distributions(search)
    states = {
        "Running": OS.RUNNING,
        "Complete": OS.COMPLETE,
        "Pruned": OS.PRUNED,
        "Failed": OS.FAIL,
    }
    for record in study.trials:
        state = states[record.state]
        value = record.value if record.state == "Complete" and _finite(record.value) else None
        if state == OS.COMPLETE and value is None:
            state = OS.FAIL
        params = {k: v for k, v in record.params.items() if k in dists}
        frozen = optuna.trial.create_trial(
            state=state,
            value=value,
            params=params,
            distributions={k: dists[k] for k in params},
            intermediate_values={k: v for k, v in record.intermediate.items() if math.isfinite(v)},
            system_attrs=record.system_attrs,
        )
        ostudy.add_trial(frozen)
    return ostudy


def running_trials(ostudy: optuna.Study) -> list[optuna.trial.Trial]:
    """Live handles on the trials a rebuilt study holds as RUNNING (to continue them)."""
    import optuna
    from optuna.trial import TrialState as OS

    return [
        optuna.trial.Trial(ostudy, t._trial_id)
        for t in ostudy.get_trials(deepcopy=False, states=(OS.RUNNING,))
    ]


# ---------------------------------------------------------------- the status summary


def best_trial(study: Study) -> StudyTrial | None:
    """The completed trial with the best finite objective (the lowest number on a tie)."""
    done = [t for t in study.trials if t.state == "Complete" and _finite(t.value)]
    if not done:
        return None
    sign = 1.0 if study.direction == "minimize" else -1.0
    return min(done, key=lambda t: (sign * (t.value or 0.0), t.number))


def summary(study: Study, job_name: str | None = None) -> SearchStatus:
    """`status.search` from the records: counts, the best trial and every trial."""
    best = best_trial(study)
    return SearchStatus(
        completed=study.count("Complete"),
        running=study.count("Running"),
        pruned=study.count("Pruned"),
        failed=study.count("Failed"),
        best=None
        if best is None or best.value is None
        else SearchBest(trial=best.number, params=dict(best.params), value=best.value),
        trials=[
            TrialRecord(
                number=t.number,
                state=t.state,
                params=dict(t.params),
                value=t.value if _finite(t.value) else None,
                step=t.step,
                job_name=f"{job_name}-trial-{t.number}" if job_name else None,
                adapter=t.adapter,
            )
            for t in study.trials
        ],
    )
