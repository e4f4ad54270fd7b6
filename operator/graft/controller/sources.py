"""Pure: whether the FineTuneJobs an OptimizeJob or AdapterBundle references are ready to use.

An OptimizeJob (`spec.source.fineTuneJobRef`) or AdapterBundle (`spec.adapters[].fineTuneJobRef`)
launches only once every referenced FineTuneJob has Succeeded. Until then the gate says why not:
still running (WaitingForSource), missing, failed, or unusable (a full fine-tune has no adapter;
bundle adapters trained on different base models). Nothing here is final: the answer is
recomputed on every reconcile, so a FineTuneJob created or fixed later lets the resource go on.

Once ready, the gate hands over each reference as the trainer needs it (`references` in
resource.json): the artifact prefix and the spec the FineTuneJob ran with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

from graft.api.kinds import InvalidResource
from graft.controller.conditions import true_condition
from graft.controller.config import OperatorConfig
from graft.naming import artifact_prefix

FINETUNE = "FineTuneJob"

GateState = Literal["ready", "waiting", "missing", "failed", "unusable"]
BLOCKING: tuple[GateState, ...] = ("missing", "failed", "unusable")
# Condition reasons for a gate that is not ready; none of them is terminal.
GATE_REASONS: dict[str, str] = {
    "waiting": "WaitingForSource",
    "missing": "SourceNotFound",
    "failed": "SourceFailed",
    "unusable": "SourceUnusable",
}


@dataclasses.dataclass(frozen=True)
class Reference:
    field: str  # the spec path holding the name, for messages
    name: str


@dataclasses.dataclass(frozen=True)
class SourceGate:
    state: GateState
    message: str
    references: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def reason(self) -> str:
        return GATE_REASONS.get(self.state, "SourcesReady")


def references(kind: str, spec: Mapping[str, Any]) -> list[Reference]:
    """The FineTuneJobs a spec names, with the field naming each."""
    refs: list[Reference] = []
    if kind == "OptimizeJob":
        ref = (spec.get("source") or {}).get("fineTuneJobRef")
        if ref:
            refs.append(Reference("spec.source.fineTuneJobRef.name", str(ref["name"])))
    elif kind == "AdapterBundle":
        for i, adapter in enumerate(spec.get("adapters") or []):
            ref = adapter.get("fineTuneJobRef")
            if ref:
                refs.append(Reference(f"spec.adapters[{i}].fineTuneJobRef.name", str(ref["name"])))
    return refs


def _progress(obj: Mapping[str, Any]) -> str:
    status = obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    percent = (status.get("progress") or {}).get("percent")
    return f"{phase}, {percent:.0f}%" if isinstance(percent, int | float) else str(phase)


def gate(
    kind: str,
    namespace: str,
    spec: Mapping[str, Any],
    found: Mapping[str, Mapping[str, Any] | None],
    config: OperatorConfig,
    prefix_of: Callable[[str], str] | None = None,
) -> SourceGate:
    """The gate for a resource whose referenced FineTuneJobs, looked up by name, are `found`.

    A FineTuneJob's outputs are under its artifact prefix on the cluster's store, or, for
    `graft run`, where `prefix_of(name)` says it wrote them: the gate is otherwise the same."""
    from graft.controller.planner import resolve_spec  # planner imports this module's users
    from graft.controller.study import best_trial_source

    refs = references(kind, spec)
    problems: dict[GateState, list[str]] = {"missing": [], "failed": [], "unusable": []}
    waiting: list[str] = []
    resolved: dict[str, Any] = {}
    base: tuple[str, str] | None = None
    if kind == "AdapterBundle" and (spec.get("baseModel") or {}).get("uri"):
        base = (str(spec["baseModel"]["uri"]), "spec.baseModel.uri")
    for ref in refs:
        obj = found.get(ref.name)
        label = f"FineTuneJob {ref.name!r}"
        if obj is None:
            problems["missing"].append(
                f"{ref.field}: {label} does not exist in namespace {namespace!r} "
                "(this resource goes on once it is created)"
            )
            continue
        failed = true_condition(obj, "Failed")
        if failed is not None:
            problems["failed"].append(
                f"{ref.field}: {label} failed ({failed.get('reason')}: {failed.get('message')})"
            )
            continue
        if true_condition(obj, "Succeeded") is None:
            waiting.append(f"{label} ({_progress(obj)})")
            continue
        try:
            run = resolve_spec(obj.get("spec"), config, FINETUNE, namespace)
        except InvalidResource as exc:
            problems["unusable"].append(f"{ref.field}: {label} has an invalid spec now: {exc}")
            continue
        model_uri = str((run.spec.get("model") or {}).get("uri", ""))
        if kind == "AdapterBundle":
            if run.spec.get("method") == "full":
                problems["unusable"].append(
                    f"{ref.field}: {label} trained the full model (method: full); a bundle "
                    "needs LoRA adapters"
                )
                continue
            if base is None:
                base = (model_uri, ref.field)
            elif model_uri != base[0]:
                problems["unusable"].append(
                    f"{ref.field}: {label} was trained on {model_uri}, not on {base[0]} "
                    f"({base[1]}); every adapter of a bundle must share one base model"
                )
                continue
        meta = obj.get("metadata") or {}
        if prefix_of is not None:
            uri = prefix_of(ref.name)
        else:
            uid = str(meta.get("uid", ""))
            uri = artifact_prefix(run.output_uri, namespace, FINETUNE, ref.name, uid)
        spec_used = run.spec
        if run.spec.get("search"):  # a study: its best trial is what the job produced
            best = best_trial_source(dict(obj.get("status") or {}), run.spec, uri)
            if best is None:
                problems["unusable"].append(
                    f"{ref.field}: {label} finished its search without a best trial"
                )
                continue
            uri, spec_used = best
        resolved[ref.name] = {"uri": uri, "uid": str(meta.get("uid", "")), "spec": spec_used}
    for state in BLOCKING:
        if problems[state]:
            return SourceGate(state, "; ".join(problems[state]))
    if waiting:
        return SourceGate("waiting", "waiting for " + ", ".join(waiting) + " to succeed")
    return SourceGate("ready", "every referenced FineTuneJob succeeded", resolved)
