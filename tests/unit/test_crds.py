"""The CRDs in crds/ and docs/api.md are what the models generate, and the schemas are structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.api import KINDS
from graft.apidoc import render_api_reference
from graft.crdgen import build_crd, crd_files, stale_crds

ROOT = Path(__file__).parents[2]


def test_crds_directory_matches_the_models() -> None:
    assert stale_crds(ROOT / "crds") == [], "crds/ is stale: run `make crds`"


def test_api_reference_matches_the_models() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == render_api_reference(), "run `make crds`"


def test_drift_is_detected(tmp_path: Path) -> None:
    for name, text in crd_files().items():
        (tmp_path / name).write_text(text)
    assert stale_crds(tmp_path) == []
    first = sorted(crd_files())[0]
    (tmp_path / first).write_text((tmp_path / first).read_text().replace("Default: 16.", ""))
    assert stale_crds(tmp_path) == [first]


def _walk(node: dict[str, Any], path: str, named: bool = True) -> list[str]:
    """Paths of nodes that break the structural-schema rules Kubernetes enforces."""
    bad = []
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "default"):
        if forbidden in node:
            bad.append(f"{path}: has {forbidden}")
    typed = "type" in node or node.get("x-kubernetes-int-or-string")
    if not typed and not node.get("x-kubernetes-preserve-unknown-fields"):
        bad.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        bad.append(f"{path}: properties beside additionalProperties")
    if named and not node.get("description") and path.count(".") > 1:
        bad.append(f"{path}: no description")
    for name, child in node.get("properties", {}).items():
        bad += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        bad += _walk(node["items"], f"{path}[]", named=False)
    if isinstance(node.get("additionalProperties"), dict):
        bad += _walk(node["additionalProperties"], f"{path}{{}}", named=False)
    return bad


@pytest.mark.parametrize("info", KINDS, ids=[k.kind for k in KINDS])
def test_schema_is_structural_and_documented(info: Any) -> None:
    crd = build_crd(info)
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema, "") == []
    spec = schema["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in spec
    assert version["subresources"] == {"status": {}}
    names = crd["spec"]["names"]
    assert names["categories"] == ["graft"] and names["shortNames"] == list(info.short_names)
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert "Age" in columns and ("Phase" in columns or "Ready" in columns)


def test_defaults_are_described_not_applied_by_the_server() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "graft.dev_finetunejobs.yaml").read_text())
    lora = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["lora"]["properties"]["r"]
    assert lora["description"].endswith("Default: 16.")
    assert lora["minimum"] == 1 and lora["maximum"] == 1024


def test_conditions_are_a_list_map_keyed_by_type() -> None:
    schema = build_crd(KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]
