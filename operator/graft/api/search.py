"""Hyper-parameter search settings of a FineTuneJob and the study state in its status."""

from __future__ import annotations

import copy
import math
from typing import Any, Final, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic.config import JsonDict

from graft.api.base import ApiModel
from graft.api.errors import FieldPathError, format_path

Scalar = str | int | float | bool

# Spec paths a search may vary. Data, model and output stay fixed: trials must be comparable.
SEARCHABLE_PREFIXES = ("training.", "lora.", "quantization.", "dataset.maxSeqLength", "method")

PRESERVE_UNKNOWN: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}


class SearchParam(ApiModel):
    """One dimension of the search space."""

    type: Literal["float", "int", "choice"] = Field(description="float, int or choice.")
    low: float | None = Field(default=None, description="Lower bound (float, int).")
    high: float | None = Field(default=None, description="Upper bound (float, int).")
    log: bool = Field(default=False, description="Sample on a log scale (float, int).")
    step: float | None = Field(default=None, gt=0, description="Grid step (int, float).")
    values: list[Any] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="The candidates (choice).",
        json_schema_extra={"items": PRESERVE_UNKNOWN},
    )

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if self.type == "choice":
            if not self.values:
                raise FieldPathError(("values",), "a choice needs a non-empty values list")
            for i, value in enumerate(self.values):
                if not isinstance(value, Scalar):
                    raise FieldPathError(
                        ("values", i), "choices must be strings, numbers or booleans"
                    )
            for name in ("low", "high"):
                if getattr(self, name) is not None:
                    raise FieldPathError((name,), "a choice takes values, not low/high")
            return self
        if self.values is not None:
            raise FieldPathError(("values",), f"a {self.type} range takes low/high, not values")
        if self.low is None or self.high is None:
            missing = "low" if self.low is None else "high"
            raise FieldPathError((missing,), f"a {self.type} range needs low and high")
        if not self.low < self.high:
            raise FieldPathError(
                ("high",), f"high ({self.high:g}) must be greater than low ({self.low:g})"
            )
        if self.log and self.low <= 0:
            raise FieldPathError(("low",), "a log-scale range needs low > 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise FieldPathError(("low",), "an int range needs whole-number bounds")
        return self

    def candidates(self) -> list[Any]:
        """The values a grid visits; only for choice and stepped int/float ranges."""
        if self.type == "choice":
            return list(self.values or [])
        assert self.low is not None and self.high is not None
        step = self.step or (1 if self.type == "int" else None)
        if step is None:
            raise ValueError("a float range in a grid needs a step")
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else values

    def extremes(self) -> list[Any]:
        """Values at the edges of the space, to check they make a valid spec."""
        if self.type == "choice":
            return list(self.values or [])
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


DEFAULT_OBJECTIVE_METRIC: Final = "eval_loss"
DEFAULT_DIRECTION: Final = "minimize"


class SearchObjective(ApiModel):
    """What the search optimizes."""

    metric: Literal["eval_loss", "perplexity", "accuracy", "f1", "bleu", "rouge"] = Field(
        default=DEFAULT_OBJECTIVE_METRIC, description="A metric computed on dataset.evalSplit."
    )
    direction: Literal["minimize", "maximize"] = Field(
        default=DEFAULT_DIRECTION, description="minimize or maximize the metric."
    )


class SearchPruning(ApiModel):
    """Stopping poor trials early on their intermediate evaluations."""

    enabled: bool = Field(default=False, description="Prune trials that fall behind.")
    rule: Literal["median", "successive_halving"] = Field(
        default="median", description="median: below the median of earlier trials at that step."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Never prune before this step.")


class SearchSpec(ApiModel):
    """A study: trials of the same job with different hyper-parameters."""

    strategy: Literal["random", "grid", "tpe"] = Field(
        default="random", description="random, grid (every combination) or tpe (Bayesian)."
    )
    trials: int = Field(default=10, ge=1, le=1000, description="Trials to run.")
    parallelism: int = Field(default=1, ge=1, le=64, description="Trials running at once.")
    objective: SearchObjective = Field(
        default_factory=SearchObjective, description="The metric to optimize."
    )
    pruning: SearchPruning = Field(default_factory=SearchPruning, description="Early pruning.")
    space: dict[str, SearchParam] = Field(
        min_length=1,
        max_length=32,
        description="Dotted spec paths (e.g. training.learningRate, lora.r) and their ranges.",
    )

    @model_validator(mode="after")
    def _check_grid(self) -> SearchSpec:
        if self.strategy != "grid":
            return self
        size = 1
        for path, param in self.space.items():
            try:
                size *= len(param.candidates())
            except ValueError as exc:
                raise FieldPathError(("space", path, "step"), str(exc)) from None
        if size > self.trials:
            raise FieldPathError(
                ("trials",), f"the grid has {size} combinations but trials is {self.trials}"
            )
        return self

    def check_against(self, spec: dict[str, Any], model: type[ApiModel]) -> None:
        """Check every path names a searchable field of `model` (the FineTuneJob spec's model,
        passed in: it imports this module) and its edge values make a valid spec."""
        base = {k: v for k, v in spec.items() if k != "search"}
        for path, param in self.space.items():
            if not path.startswith(SEARCHABLE_PREFIXES):
                raise FieldPathError(
                    ("search", "space", path),
                    f"cannot search {path!r}; searchable: training.*, lora.*, quantization.*, "
                    "dataset.maxSeqLength, method",
                )
            if not _path_exists(model, path.split(".")):
                raise FieldPathError(("search", "space", path), f"no field {path!r} in the spec")
            for value in param.extremes():
                trial = apply_params(base, {path: value})
                try:
                    model.model_validate(trial)
                except ValidationError as exc:
                    first = exc.errors(include_url=False)[0]
                    where = format_path(first["loc"])
                    raise FieldPathError(
                        ("search", "space", path),
                        f"value {value!r} gives an invalid spec ({where}: {first['msg']})",
                    ) from None


def _path_exists(model: type[ApiModel], parts: list[str]) -> bool:
    by_alias = {(f.alias or name): f for name, f in model.model_fields.items()}
    field = by_alias.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    for candidate in getattr(field.annotation, "__args__", (field.annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, ApiModel):
            return _path_exists(candidate, parts[1:])
    return False


def apply_params(spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a camelCase spec with dotted-path parameters set."""
    result = copy.deepcopy(spec)
    for path, value in params.items():
        node = result
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return result


class TrialRecord(ApiModel):
    """One trial of the study."""

    number: int = Field(ge=0, description="Trial number, from 0.")
    state: Literal["Pending", "Running", "Complete", "Pruned", "Failed"] = Field(
        description="Where the trial is."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The trial's parameters.",
        json_schema_extra=PRESERVE_UNKNOWN,
    )
    value: float | None = Field(default=None, description="The objective, once known.")
    step: int | None = Field(default=None, ge=0, description="Last step reported.")
    job_name: str | None = Field(default=None, description="The trial's Job.")
    adapter: str | None = Field(default=None, description="The trial's adapter URI.")


class SearchBest(ApiModel):
    """The best trial so far."""

    trial: int = Field(ge=0, description="Trial number.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Its parameters.", json_schema_extra=PRESERVE_UNKNOWN
    )
    value: float = Field(description="Its objective value.")


class SearchStatus(ApiModel):
    """Counts and records of the study."""

    completed: int = Field(default=0, ge=0, description="Trials that finished.")
    running: int = Field(default=0, ge=0, description="Trials running now.")
    pruned: int = Field(default=0, ge=0, description="Trials stopped early.")
    failed: int = Field(default=0, ge=0, description="Trials that failed.")
    best: SearchBest | None = Field(default=None, description="The best trial so far.")
    trials: list[TrialRecord] = Field(default_factory=list, description="Every trial.")
