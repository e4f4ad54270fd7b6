"""`make demo`: the quickstart on the local cluster, each phase timed.

Brings the cluster up (or reuses it), builds the images, installs the chart with Helm v4, seeds
the S3 store with the tiny model and the phrase->tone data, applies examples/finetunejob.yaml,
shows live progress, and prints the artifacts and the metrics before and after training.
OptimizeJob and AdapterBundle join the chain once their reconcilers land.
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
EXAMPLE = quickstart.REPO / "examples" / "finetunejob.yaml"
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


def show_progress(api: Any, name: str) -> dict[str, Any]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(name, total=None, steps="", detail="waiting for the trainer pod")

        def update(obj: dict[str, Any]) -> None:
            status = obj.get("status") or {}
            progress = status.get("progress") or {}
            metrics = status.get("metrics") or {}
            detail = status.get("phase") or "Pending"
            if metrics.get("evalLoss") is not None:
                detail += f"  eval loss {metrics['evalLoss']:.4f}"
            step, total = progress.get("step") or 0, progress.get("totalSteps")
            bar.update(
                task,
                total=total,
                completed=step,
                steps=f"step {step}/{total}" if total else "",
                detail=detail,
            )

        return quickstart.wait_until_done(api, NAMESPACE, "finetunejobs", name, 900, on_poll=update)


def print_results(obj: dict[str, Any], s3: Any) -> None:
    status = obj["status"]
    console.print(f"phase: [bold]{status['phase']}[/]")
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
    job = yaml.safe_load(EXAMPLE.read_text())
    name = job["metadata"]["name"]
    with phase("apply → Succeeded"):
        quickstart.ensure_namespace(api, NAMESPACE)
        quickstart.copy_secret(api, "graft-s3", "default", NAMESPACE)
        # A rerun trains afresh: a new resource gets a new uid and so a new artifact prefix.
        quickstart.delete(api, NAMESPACE, "finetunejobs", name)
        quickstart.apply(api, NAMESPACE, [job])
        done = show_progress(api, name)
    print_results(done, s3)
    table = Table("phase", "seconds")
    for label, took in timings:
        table.add_row(label, f"{took:.1f}")
    console.print(table)
    succeeded = quickstart.condition(done, "Succeeded")
    if not succeeded or succeeded["status"] != "True":
        failed = quickstart.condition(done, "Failed") or {}
        console.print(f"[red]FineTuneJob failed: {failed.get('reason')}: {failed.get('message')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
