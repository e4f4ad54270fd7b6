"""Property-based: whatever a user writes, validation answers with field-pointed refusals or a
spec the operator can launch. Random documents and random mutations of the examples never crash
the models, every refusal names a field path under `spec`, and every spec that passes builds a
Job that the Kubernetes 1.28 schema accepts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graft.api.kinds import InvalidResource, parse_spec
from graft.controller import planner
from graft.controller.config import OperatorConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {
    doc["kind"]: doc["spec"]
    for name in ("finetunejob.yaml", "finetunejob-search.yaml", "optimizejob.yaml")
    for doc in yaml.safe_load_all((REPO / "examples" / name).read_text())
}
EXAMPLES["AdapterBundle"] = yaml.safe_load((REPO / "examples" / "adapterbundle.yaml").read_text())[
    "spec"
]
KINDS = sorted(EXAMPLES)
CONFIG = OperatorConfig(trainer_image="graft/trainer:test", output_uri="s3://graft/out/")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["s3://b/k/", "hf://org/m", "lora", "qlora", "auto", "1Gi", "", "%"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=12,
)


def paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON-like value (the root included)."""
    found = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths(value, (*at, i))
    return found


@st.composite
def mutated_examples(draw: st.DrawFn) -> tuple[str, Any]:
    """An example spec with one to three random edits: a value replaced, a key dropped, an
    unknown key added."""
    kind = draw(st.sampled_from(KINDS))
    spec: Any = copy.deepcopy(EXAMPLES[kind])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(paths(spec)))
        edit = draw(st.sampled_from(["replace", "drop", "add"]))
        if not at:
            spec = draw(json_values) if edit == "replace" else spec
            continue
        parent = spec
        for part in at[:-1]:
            parent = parent[part]
        if edit == "replace":
            parent[at[-1]] = draw(json_values)
        elif edit == "drop" and isinstance(parent, dict):
            parent.pop(at[-1])
        elif edit == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return kind, spec


def check(kind: str, spec: Any) -> None:
    try:
        resolved = planner.resolve_spec(spec, CONFIG, kind, "team-a")
    except InvalidResource as exc:
        assert exc.issues, "a refusal with no issue"
        for issue in exc.issues:
            assert issue.path[:1] == ("spec",), issue
            assert str(issue.message).strip(), issue
        return
    obj = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "prop", "namespace": "team-a", "uid": "0123abcd-0000"},
        "spec": spec,
    }
    job = planner.build_trainer_job(obj, resolved.spec, CONFIG, spec_hash_=resolved.spec_hash)
    kubernetes_validate.validate(job, "1.28.0", strict=True)
    configmap = planner.build_spec_configmap(obj, resolved)
    kubernetes_validate.validate(configmap, "1.28.0", strict=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), json_values)
def test_random_documents_are_refused_by_field(kind: str, spec: Any) -> None:
    check(kind, spec)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_examples())
def test_mutated_examples_are_refused_by_field_or_launchable(case: tuple[str, Any]) -> None:
    check(*case)


def test_the_examples_themselves_launch() -> None:
    for kind in KINDS:
        parse_spec(kind, EXAMPLES[kind])
        check(kind, copy.deepcopy(EXAMPLES[kind]))
