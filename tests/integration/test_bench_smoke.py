"""Every benchmark in bench/ starts from a clean clone and prints its JSON: each runs in its
smoke mode (tiny sizes, seconds), whose figures mean nothing but whose shape is checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from graft_trainer.allocator import find_tcmalloc
from tests.fixtures.cluster import ClusterInfo

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def smoke_env(**extra: str) -> dict[str, str]:
    """The smokes start some twenty Python processes (each contender in a fresh interpreter),
    and each imports torch, transformers, peft and datasets: without bytecode, compiling those
    thousands of modules is most of a smoke's time. `make venv` compiles them into the venv;
    one made before it did gets them written in place by the first smoke, so bytecode writing
    stays on even where PYTHONDONTWRITEBYTECODE is set."""
    env = {**os.environ, **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_smoke(script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=400,
        env=smoke_env(**(env or {})),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    machine = report["machine"]
    assert machine["cpus"] >= 1 and isinstance(machine["cpu_flags"], list)
    assert machine["native_bf16"] == bool({"avx512_bf16", "amx_bf16"} & set(machine["cpu_flags"]))
    return report


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.trainer
@pytest.mark.timeout(600)
def test_trainer_throughput_smoke() -> None:
    report = run_smoke("trainer_throughput.py")
    summary = report["summary"]
    assert report["steps"] == 2 and report["smoke"] is True
    for key in (
        "graft_vs_plain_tokens_per_second",
        "graft_vs_stock_tokens_per_second",
        "graft_vs_plain_peak_rss",
        "graft_vs_stock_peak_rss",
    ):
        assert positive(summary[key]), (key, summary)
    assert math.isfinite(summary["graft_vs_stock_final_loss_diff"])


@pytest.mark.trainer
@pytest.mark.timeout(600)
def test_onnx_decode_smoke(tmp_path: Path) -> None:
    report = run_smoke("onnx_decode.py", "--work-dir", str(tmp_path))
    assert report["smoke"] is True
    speeds = report["decode_tokens_per_second"]
    assert set(speeds) == {
        "onnx_int4",
        "pytorch_fp32",
        "bundle_base",
        "bundle_adapter_active",
        "bundle_no_adapter",
    }
    assert all(positive(v) for v in speeds.values()), speeds
    assert positive(report["int4_speedup_vs_pytorch_fp32"])
    assert math.isfinite(report["adapter_overhead"])
    # the other LoRA layouts (issue 19's levers) were built, served and measured in the same
    # rounds; the float32 one computes what the shipped layout does (same greedy tokens)
    layouts = report["layouts"]
    assert set(layouts) == {"stacked", "split_fp16", "stacked_fp16"}, layouts
    assert all(positive(v["decode_tokens_per_second"]) for v in layouts.values()), layouts
    assert all(math.isfinite(v["adapter_overhead"]) for v in layouts.values()), layouts
    assert layouts["stacked"]["same_tokens_as_shipped"] is True, layouts


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_operator_latency_smoke(control_plane: ClusterInfo) -> None:
    report = run_smoke("operator_latency.py", "--kubeconfig", str(control_plane.kubeconfig))
    assert report["count"] == 3 and report["smoke"] is True
    for key in ("bare_job_create_to_watch", "ftj_create_to_job_on_watch"):
        assert positive(report[key]["p50_ms"]), report[key]
    # each FineTuneJob got its Job through the operator, with at least that one create
    assert report["operator_api_requests_per_ftj"].get("POST jobs 201") == 1.0, report
    assert positive(report["operator_rss_mib"])
    # the tutorial kopf operator served the same burst in its namespace: the baseline is real
    tutorial = report["tutorial"]
    assert tutorial["jobs_created"] == 3 and tutorial["jobs_missing_after_wait"] == 0, tutorial
    assert positive(tutorial["ftj_create_to_job_on_watch"]["p50_ms"])
    assert positive(tutorial["operator_peak_rss_mib"])
    assert positive(report["ratios"]["graft_over_tutorial_p50"]), report["ratios"]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_operator_scale_smoke(control_plane: ClusterInfo) -> None:
    report = run_smoke("operator_scale.py", "--kubeconfig", str(control_plane.kubeconfig))
    assert report["objects"] == 40 and report["smoke"] is True
    empty, busy = report["operators"]["empty"], report["operators"]["busy"]
    for operator in (empty, busy):
        # both operators served their namespace: a launch each, and memory measured
        assert operator["api_requests"] >= 2 * report["jobs"], report
        assert positive(operator["rss_mib"]) and positive(operator["idle_rss_mib"]), report
    assert positive(report["busy_over_empty"]["rss_mib"]), report


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_operator_soak_smoke(control_plane: ClusterInfo) -> None:
    report = run_smoke("operator_soak.py", "--kubeconfig", str(control_plane.kubeconfig))
    assert report["smoke"] is True and len(report["samples"]) >= 3, report
    assert report["actions"]["delete"] > 0 and report["actions"]["resume"] > 0, report
    # what the operator keeps per resource follows the live resources, and goes with them
    assert report["tracked_with_live_resources"]["bodies"] >= 1, report
    assert report["tracked_with_live_resources"]["bodies"] <= report["live_at_end"] + 10, report
    left = report["tracked_after_deleting_all"]
    assert all(v == 0 for v in left.values()), left


@pytest.mark.trainer
@pytest.mark.timeout(300)
def test_model_cache_smoke() -> None:
    report = run_smoke("model_cache.py", env={"AWS_ENDPOINT_URL": ""})
    assert report["smoke"] is True
    assert set(report["fetch"]) == {"s3-artifact", "s3-folder", "hf"}
    for name, fetch in report["fetch"].items():
        # every source served the whole model both times, from a cache the first job filled
        assert fetch["bytes"] > 1 << 20, (name, fetch)
        assert positive(fetch["first_seconds"]) and positive(fetch["second_seconds"]), fetch


def check_realistic(report: dict[str, Any], models: set[str], contenders: set[str]) -> None:
    assert report["smoke"] is True and report["steps"] == 2
    assert positive(report["matmul_peak_gflops"])
    assert set(report["models"]) == models, report["models"].keys()
    for key, entry in report["models"].items():
        results = entry["results"]
        assert set(results) == contenders, (key, results.keys())
        losses = []
        for name, r in results.items():
            # each contender trained: tokens, targets among them, a finite loss, a FLOP rate
            assert r["tokens"] > r["target_tokens"] > 0, (key, name, r)
            for field in ("tokens_per_second", "peak_rss_bytes", "gflops_per_second"):
                assert positive(r[field]), (key, name, field, r)
            assert math.isfinite(r["final_loss"]), (key, name, r)
            losses.append(r["final_loss"])
            # the engine runs under the malloc the trainer's commands restart under; the stock
            # contenders under the system's
            preferred = "tcmalloc" if name == "graft" and find_tcmalloc() else "system"
            assert r["allocator"] == preferred, (key, name, r["allocator"])
        # same model, data and steps: the losses agree (random weights, ~ln(vocab))
        assert max(losses) <= 1.05 * min(losses), (key, losses)
        for k, v in entry["summary"].items():
            assert math.isfinite(v) and (v > 0 or "loss_diff" in k), (key, k, v)


@pytest.mark.trainer
@pytest.mark.timeout(600)
def test_trainer_realistic_smoke() -> None:
    report = run_smoke("trainer_realistic.py")
    check_realistic(report, {"smoke-smollm", "smoke-qwen"}, {"plain", "trl", "graft"})
    assert report["precision"] == "fp32"
    summary = report["models"]["smoke-qwen"]["summary"]
    assert {"graft_vs_trl_tokens_per_second", "graft_vs_plain_peak_rss"} <= set(summary)


@pytest.mark.trainer
@pytest.mark.timeout(600)
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """bench/gpu_check.sh --dry-run: the GPU check's own code path (LoRA and QLoRA, the engine
    against TRL) on the CPU with tiny shapes."""
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=500,
        env=smoke_env(OUT=str(tmp_path), PYTHON=sys.executable),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    check_realistic(report, {"smoke-qwen", "smoke-qwen/qlora"}, {"trl", "graft"})
