"""The runc wrapper rewrites a negative oomScoreAdj to 0 and passes every argument on."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.cluster import load_localcluster

lc = load_localcluster()
pytestmark = pytest.mark.skipif(shutil.which("jq") is None, reason="the wrapper needs jq")


def _setup(tmp_path: Path, oom: int | None) -> tuple[Path, Path, Path]:
    fake_runc = tmp_path / "fake-runc"
    argv_out = tmp_path / "argv"
    fake_runc.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_out}\n')
    fake_runc.chmod(0o755)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(lc.render_runc_wrapper(str(fake_runc)))
    wrapper.chmod(0o755)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    proc: dict[str, object] = {"args": ["/pause"]}
    if oom is not None:
        proc["oomScoreAdj"] = oom
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "process": proc}))
    return wrapper, bundle, argv_out


@pytest.mark.parametrize("style", ["separate", "equals"])
def test_negative_oom_score_adj_becomes_zero(tmp_path: Path, style: str) -> None:
    wrapper, bundle, argv_out = _setup(tmp_path, -998)
    bundle_args = ["--bundle", str(bundle)] if style == "separate" else [f"--bundle={bundle}"]
    args = ["--root", "/run/x", "--log-format", "json", "create", *bundle_args, "cid"]
    subprocess.run([str(wrapper), *args], check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["process"]["oomScoreAdj"] == 0
    assert cfg["process"]["args"] == ["/pause"]
    assert argv_out.read_text().splitlines() == args


@pytest.mark.parametrize("oom", [None, 0, 500])
def test_other_values_untouched(tmp_path: Path, oom: int | None) -> None:
    wrapper, bundle, argv_out = _setup(tmp_path, oom)
    before = (bundle / "config.json").read_text()
    subprocess.run([str(wrapper), "create", "-b", str(bundle), "cid"], check=True)
    assert (bundle / "config.json").read_text() == before
    assert argv_out.read_text().splitlines() == ["create", "-b", str(bundle), "cid"]


def test_no_bundle_passes_through(tmp_path: Path) -> None:
    wrapper, _, argv_out = _setup(tmp_path, -998)
    subprocess.run([str(wrapper), "--version"], check=True)
    assert argv_out.read_text().splitlines() == ["--version"]
