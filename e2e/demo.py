"""`make demo`: the quickstart on the local cluster, each phase timed.

Brings the cluster up (or reuses it), builds the images, installs the chart with Helm v4, seeds
the S3 store with the tiny model and the phrase->tone data, applies examples/quickstart.yaml
(two FineTuneJobs, an OptimizeJob and an AdapterBundle referencing them), shows live progress,
and prints the metrics before and after training, the artifacts, and what onnxruntime-genai
generated with the exported model and with each adapter of the bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import quickstart
from tests.fixtures.cluster import load_localcluster

NAMESPACE = "graft-demo"
OPERATOR_NAMESPACE = "graft-system"
EXAMPLE = quickstart.REPO / "examples" / "quickstart.yaml"
console = Console()
timings: list[tuple[str, float]] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    console.rule(f"[bold]{name}")
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    timings.append((name, took))
    console.print(f"[green]{name}: {took:.1f}s")


def localcluster(*args: str) -> None:
    script = quickstart.REPO / "e2e" / "cluster" / "localcluster.py"
    subprocess.run([sys.executable, str(script), *args], check=True)


PLURALS = {
    "FineTuneJob": "finetunejobs",
    "OptimizeJob": "optimizejobs",
    "AdapterBundle": "adapterbundles",
}


def _detail(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    detail = str(status.get("phase") or "Pending")
    metrics = status.get("metrics") or {}
    if metrics.get("evalLoss") is not None:
        detail += f"  eval loss {metrics['evalLoss']:.4f}"
    running = quickstart.condition(obj, "Running") or {}
    if running.get("reason") == "WaitingForSource":
        detail += "  (waiting for its FineTuneJob)"
    return detail


def _done(obj: dict[str, Any]) -> bool:
    done = "Ready" if obj["kind"] == "AdapterBundle" else "Succeeded"
    for kind in (done, "Failed"):
        cond = quickstart.condition(obj, kind)
        if cond and cond["status"] == "True" and cond["reason"] != "SourceNotFound":
            return True
    return False


def show_progress(
    api: Any, docs: list[dict[str, Any]], timeout: float = 1800
) -> list[dict[str, Any]]:
    """One live row per resource until every one has finished (or failed)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=console) as bar:
        tasks = {
            key: bar.add_task(f"{key[0]}/{key[1]}", total=None, steps="", detail="Pending")
            for key in keys
        }
        while True:
            objs = [quickstart.read(api, NAMESPACE, PLURALS[k], n) for k, n in keys]
            for key, obj in zip(keys, objs, strict=True):
                progress = (obj.get("status") or {}).get("progress") or {}
                step, total = progress.get("step") or 0, progress.get("totalSteps")
                finished = _done(obj)
                if key[0] != "FineTuneJob":  # one stage, no steps: done or not
                    step, total = (1, 1) if finished else (0, None)
                bar.update(
                    tasks[key],
                    total=total,
                    completed=step,
                    steps=f"step {step}/{total}" if key[0] == "FineTuneJob" and total else "",
                    detail=_detail(obj),
                )
            if all(_done(o) for o in objs) or time.monotonic() > deadline:
                return objs
            time.sleep(1)


def print_finetune(obj: dict[str, Any], s3: Any) -> None:
    status = obj["status"]
    console.rule(f"FineTuneJob/{obj['metadata']['name']}: {status['phase']}")
    metrics = status.get("metrics") or {}
    table = Table("metric", "before", "after")
    table.add_row("eval loss", _num(metrics.get("baselineEvalLoss")), _num(metrics.get("evalLoss")))
    table.add_row("accuracy", _num(metrics.get("baselineAccuracy")), _num(metrics.get("accuracy")))
    table.add_row("perplexity", "", _num(metrics.get("perplexity")))
    table.add_row("f1", "", _num(metrics.get("f1")))
    console.print(table)
    adapter = (status.get("artifacts") or {}).get("adapter")
    if not adapter:
        return
    bucket, _, key = adapter.removeprefix("s3://").partition("/")
    prefix = key.rstrip("/").rsplit("/", 1)[0] + "/"
    console.print(f"artifacts under s3://{bucket}/{prefix}")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for item in page.get("Contents", []):
            if "/checkpoints/" not in item["Key"]:
                console.print(f"  {item['Key'].removeprefix(prefix)}  ({item['Size']} bytes)")


def print_optimize(obj: dict[str, Any]) -> None:
    status = obj["status"]
    console.rule(f"OptimizeJob/{obj['metadata']['name']}: {status['phase']}")
    metrics = status.get("metrics") or {}
    size = metrics.get("sizeBytes")
    console.print(
        f"ONNX model: {(status.get('artifacts') or {}).get('model')}  ({size / 1e6:.1f} MB)"
        if size
        else ""
    )
    console.print(
        f"perplexity PyTorch {_num(metrics.get('perplexityPyTorch'))} -> ONNX "
        f"{_num(metrics.get('perplexityOnnx'))}; decode "
        f"{metrics.get('decodeTokensPerSecond') or 0:,.0f} tokens/s"
    )
    for gen in status.get("generations") or []:
        console.print(f"  onnxruntime-genai: {gen['prompt']!r} -> {gen['output']!r}")


def print_bundle(obj: dict[str, Any]) -> None:
    status = obj["status"]
    ready = quickstart.condition(obj, "Ready") or {}
    console.rule(f"AdapterBundle/{obj['metadata']['name']}: Ready={ready.get('status')}")
    console.print(f"base model: {(status.get('artifacts') or {}).get('model')}")
    table = Table("adapter", "rank", "smoke test", "decode overhead")
    for report in status.get("adapters") or []:
        overhead = report.get("decodeOverhead")
        table.add_row(
            report["name"],
            str(report.get("rank")),
            str(report.get("smokeTest")),
            "" if overhead is None else f"{overhead:+.1%}",
        )
    console.print(table)
    console.print("onnxruntime-genai, one base, per-request adapter:")
    answers = Table("prompt", "adapter", "generates", "expected", "")
    for row in quickstart.adapter_answers(status):
        answers.add_row(
            row["phrase"],
            row["adapter"],
            repr(row["output"]),
            str(row["expected"]),
            "[green]right" if row["correct"] else "[red]wrong",
        )
    console.print(answers)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def main() -> int:
    lc = load_localcluster()
    cluster = lc.LocalCluster(lc.default_state_dir())
    with phase("cluster"):
        localcluster("up", "--mode", "full")
    with phase("images"):
        localcluster("image-trainer")
        localcluster("image-operator")
    from kubernetes import config as k8s_config

    api = k8s_config.new_client_from_config(config_file=str(cluster.cfg.kubeconfig))
    env = lc.s3_env(cluster.cfg)
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    with phase("helm install"):
        quickstart.install_operator(
            cluster.cfg.kubeconfig, api, OPERATOR_NAMESPACE, watch_namespaces=[NAMESPACE]
        )
    with phase("seed the store"):
        seeded = quickstart.seed_store(s3, env["GRAFT_ARTIFACT_BUCKET"], lc.cache_dir() / "demo")
        console.print(json.dumps(seeded, indent=1))
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    with phase("apply → Succeeded / Ready"):
        quickstart.ensure_namespace(api, NAMESPACE)
        quickstart.copy_secret(api, "graft-s3", "default", NAMESPACE)
        # A rerun starts afresh: a new resource gets a new uid and so a new artifact prefix.
        for doc in docs:
            quickstart.delete(api, NAMESPACE, PLURALS[doc["kind"]], doc["metadata"]["name"])
        quickstart.apply(api, NAMESPACE, docs)
        results = show_progress(api, docs)
    failures = []
    for obj in results:
        failed = quickstart.condition(obj, "Failed") or {}
        if not _done(obj) or failed.get("status") == "True":
            failures.append(
                f"{obj['kind']}/{obj['metadata']['name']}: "
                f"{failed.get('reason') or 'not finished in time'}: {failed.get('message', '')}"
            )
            continue
        if obj["kind"] == "FineTuneJob":
            print_finetune(obj, s3)
        elif obj["kind"] == "OptimizeJob":
            print_optimize(obj)
        else:
            print_bundle(obj)
    table = Table("phase", "seconds")
    for label, took in timings:
        table.add_row(label, f"{took:.1f}")
    console.print(table)
    for line in failures:
        console.print(f"[red]{line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
