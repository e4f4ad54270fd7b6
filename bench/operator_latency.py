#!/usr/bin/env python3
"""Operator latency at a burst: N FineTuneJobs created at once; time from create to the trainer
Job appearing, next to a bare API create (N Jobs created directly) and the kopf operator most
tutorials lead to (bench/tutorial_operator.py, the same burst in its own namespace) in the same
run, and each operator's memory. `ratios` holds Graft against both, beside the goals.

    make cluster-up   # or: CLUSTER_MODE=control-plane make cluster-up
    .venv/bin/python bench/operator_latency.py [--count 200] [--kubeconfig /tmp/graft-cluster/kubeconfig]

Both paths are timed the same way: from just before the create request to the moment the Job
shows up on a watch the benchmark holds open (local monotonic clock). Prints one JSON object.
`--smoke` (3 at once) is what `make test` runs against its control-plane cluster, so the
benchmark cannot rot; its figures mean nothing. Needs the `bench` extra (kubernetes_asyncio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_facts
from bench.operator_process import (
    api_requests,
    cpu_seconds,
    delete_namespaces,
    prepare,
    rss_mib,
    start_operator,
    stop_operator,
)

REPO = Path(__file__).resolve().parents[1]
NO_NODE = {"graft.dev/bench-no-node": "true"}
FIRST_SIGHT = ("ADDED", "MODIFIED")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": round(pct(ms, 0.5), 1),
        "p95_ms": round(pct(ms, 0.95), 1),
        "max_ms": round(max(ms), 1),
        "mean_ms": round(statistics.mean(ms), 1),
    }


def ftj(name: str, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"uri": "s3://graft-artifacts/models/tiny/"},
            "dataset": {"uri": "s3://graft-artifacts/data/p.jsonl", "textTemplate": "{a} {b}"},
            "output": {"uri": "s3://graft-artifacts/bench/"},
            "scheduling": {"nodeSelector": NO_NODE},
        },
    }


def bare_job(name: str, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": NO_NODE,
                    "containers": [{"name": "c", "image": "graft/none:bench"}],
                }
            },
        },
    }


async def burst(kubeconfig: str, count: int, operator_pid: int) -> dict[str, Any]:
    from kubernetes_asyncio import client, config, watch

    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 64
    api = client.ApiClient(cfg)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    custom = client.CustomObjectsApi(api)
    ns_op, ns_bare = NS_OP, NS_BARE
    seen: dict[str, float] = {}
    # Objects whose ADDED event this benchmark's watch never got (one run in about ten lost
    # one in a 200-burst): timed from their first MODIFIED instead, and counted.
    first_seen_modified: set[str] = set()

    def first_sight(key: str, kind: str) -> None:
        if key not in seen:
            seen[key] = time.monotonic()
            if kind == "MODIFIED":
                first_seen_modified.add(key)

    async def watch_jobs(ns: str) -> None:
        w = watch.Watch()
        async with w.stream(batch.list_namespaced_job, ns, timeout_seconds=600) as stream:
            async for event in stream:
                if event["type"] in FIRST_SIGHT:
                    first_sight(f"{ns}/{event['object'].metadata.name}", event["type"])

    async def watch_finetunejobs(ns: str) -> None:
        w = watch.Watch()
        async with w.stream(
            custom.list_namespaced_custom_object,
            "graft.dev",
            "v1alpha1",
            ns,
            "finetunejobs",
            timeout_seconds=600,
        ) as stream:
            async for event in stream:
                if event["type"] in FIRST_SIGHT:
                    first_sight(f"{ns}/{event['object']['metadata']['name']}", event["type"])

    watchers = [
        asyncio.create_task(watch_jobs(ns_op)),
        asyncio.create_task(watch_jobs(ns_bare)),
        asyncio.create_task(watch_finetunejobs(ns_op)),
    ]
    await asyncio.sleep(1.0)

    async def timed(coro_fn: Any, key: str) -> tuple[str, float, float]:
        start = time.monotonic()
        await coro_fn()
        return key, start, time.monotonic() - start

    async def wait_seen(keys: list[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not all(k in seen for k in keys):
            if time.monotonic() > deadline:
                missing = [k for k in keys if k not in seen]
                raise SystemExit(f"{len(missing)} Jobs never appeared, e.g. {missing[:3]}")
            await asyncio.sleep(0.05)

    # 1. Bare API: N Jobs created directly.
    bare = await asyncio.gather(
        *(
            timed(
                lambda i=i: batch.create_namespaced_job(
                    ns_bare, bare_job(f"bare-{i:03d}", ns_bare)
                ),
                f"{ns_bare}/bare-{i:03d}",
            )
            for i in range(count)
        )
    )
    await wait_seen([k for k, _, _ in bare])
    # Let the Job controller finish the bare Jobs' pods before the second burst.
    while len((await core.list_namespaced_pod(ns_bare)).items) < count:
        await asyncio.sleep(0.2)
    await asyncio.sleep(2)
    # 2. Through the operator: N FineTuneJobs, the trainer Job is <name>-train.
    cpu_before = cpu_seconds(operator_pid)
    ops = await asyncio.gather(
        *(
            timed(
                lambda i=i: custom.create_namespaced_custom_object(
                    "graft.dev", "v1alpha1", ns_op, "finetunejobs", ftj(f"ftj-{i:03d}", ns_op)
                ),
                f"{ns_op}/ftj-{i:03d}-train",
            )
            for i in range(count)
        )
    )
    await wait_seen([k for k, _, _ in ops])
    memory = rss_mib(operator_pid)
    cpu = cpu_seconds(operator_pid) - cpu_before
    for task in watchers:
        task.cancel()
    await api.close()
    return {
        "count": count,
        "bare_job_create_call": summary([d for _, _, d in bare]),
        "bare_job_create_to_watch": summary([seen[k] - s for k, s, _ in bare]),
        "ftj_create_call": summary([d for _, _, d in ops]),
        # The floor under the operator's latency: its watch sees a FineTuneJob no sooner.
        "ftj_create_to_ftj_on_watch": summary(
            [seen[k.removesuffix("-train")] - s for k, s, _ in ops]
        ),
        "ftj_create_to_job_on_watch": summary([seen[k] - s for k, s, _ in ops]),
        "ftj_on_watch_to_job_on_watch": summary(
            [seen[k] - seen[k.removesuffix("-train")] for k, _, _ in ops]
        ),
        "first_seen_as_modified": len(first_seen_modified),
        "operator_cpu_seconds_for_burst": round(cpu, 2),
        "operator_rss_mib": memory.get("VmRSS"),
        "operator_peak_rss_mib": memory.get("VmHWM"),
    }


async def tutorial_burst(kubeconfig: str, count: int, operator_pid: int) -> dict[str, Any]:
    """The same FineTuneJob burst through the tutorial kopf operator (bench/tutorial_operator.py),
    in its own namespace: create -> Job on a watch, and its memory. Jobs that have not appeared
    within TUTORIAL_WAIT_S are counted, not waited for (at 200 the tutorial operator has been
    seen not to finish)."""
    from kubernetes_asyncio import client, config, watch

    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 64
    api = client.ApiClient(cfg)
    batch, custom = client.BatchV1Api(api), client.CustomObjectsApi(api)
    seen: dict[str, float] = {}

    async def watch_jobs() -> None:
        w = watch.Watch()
        async with w.stream(batch.list_namespaced_job, NS_TUT, timeout_seconds=900) as stream:
            async for event in stream:
                if event["type"] == "ADDED":
                    seen.setdefault(event["object"].metadata.name, time.monotonic())

    watcher = asyncio.create_task(watch_jobs())
    await asyncio.sleep(1.0)
    starts: dict[str, float] = {}

    async def create(i: int) -> None:
        name = f"ftj-{i:03d}"
        starts[f"{name}-train"] = time.monotonic()
        await custom.create_namespaced_custom_object(
            "graft.dev", "v1alpha1", NS_TUT, "finetunejobs", ftj(name, NS_TUT)
        )

    await asyncio.gather(*(create(i) for i in range(count)))
    deadline = time.monotonic() + TUTORIAL_WAIT_S
    while not all(k in seen for k in starts) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    memory = rss_mib(operator_pid)
    watcher.cancel()
    await api.close()
    done = [seen[k] - s for k, s in starts.items() if k in seen]
    return {
        "jobs_created": len(done),
        "jobs_missing_after_wait": count - len(done),
        "ftj_create_to_job_on_watch": summary(done) if done else None,
        "operator_rss_mib": memory.get("VmRSS"),
        "operator_peak_rss_mib": memory.get("VmHWM"),
    }


def run_tutorial(kubeconfig: str, count: int, port: int) -> dict[str, Any]:
    """Start the tutorial operator on NS_TUT, run its burst, stop it."""
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    fd, log_name = tempfile.mkstemp(prefix=f"tutorial-operator-{NS_TUT}-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "kopf", "run", "--standalone", "--namespace", NS_TUT),
                f"--liveness=http://127.0.0.1:{port}/healthz",
                str(TUTORIAL),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(
                        f"the tutorial operator did not start; log: {log_name}"
                    ) from None
                time.sleep(0.2)
        time.sleep(2)  # initial listing done
        result = asyncio.run(tutorial_burst(kubeconfig, count, proc.pid))
        result["operator_log"] = log_name
        return result
    finally:
        stop_operator(proc)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(result: dict[str, Any]) -> dict[str, Any]:
    """Graft against the tutorial operator and the bare create, as the goals read."""
    ours, theirs = result["ftj_create_to_job_on_watch"], result["tutorial"]
    tut = theirs["ftj_create_to_job_on_watch"] or {}
    return {
        "graft_over_tutorial_p50": ratio(ours["p50_ms"], tut.get("p50_ms")),
        "graft_over_tutorial_p95": ratio(ours["p95_ms"], tut.get("p95_ms")),
        # the operator's share (resource on its watch -> Job on the watch) against the API
        # server's own create -> watch
        "operator_share_p50_over_bare_p50": ratio(
            result["ftj_on_watch_to_job_on_watch"]["p50_ms"],
            result["bare_job_create_to_watch"]["p50_ms"],
        ),
        "graft_rss_over_tutorial_rss": ratio(
            result["operator_peak_rss_mib"], theirs["operator_peak_rss_mib"]
        ),
        "goals": {
            "graft_over_tutorial_p50": 0.5,
            "graft_over_tutorial_p95": 0.5,
            "operator_share_p50_over_bare_p50": 1.0,
            "operator_peak_rss_mib": 100,
        },
    }


NS_OP = f"bench-op-{uuid.uuid4().hex[:5]}"
NS_BARE = f"bench-bare-{uuid.uuid4().hex[:5]}"
NS_TUT = f"bench-tut-{uuid.uuid4().hex[:5]}"
TUTORIAL = REPO / "bench" / "tutorial_operator.py"
TUTORIAL_WAIT_S = 180.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG", "/tmp/graft-cluster/kubeconfig")
    )
    parser.add_argument("--keep", action="store_true", help="keep the namespaces")
    parser.add_argument("--profile", help="write a cProfile of the operator to this file")
    parser.add_argument("--smoke", action="store_true", help="3 at once (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args.count = 3

    namespaces = (NS_OP, NS_BARE, NS_TUT)
    prepare(args.kubeconfig, namespaces)
    port = 18000 + os.getpid() % 1000
    profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
    proc = None
    try:
        proc, log_name = start_operator(args.kubeconfig, NS_OP, port, python_args=profile)
        time.sleep(2)  # initial listings done
        idle = rss_mib(proc.pid)
        result = asyncio.run(burst(args.kubeconfig, args.count, proc.pid))
        time.sleep(5)  # the status patches and Events that follow the launches
        requests = api_requests(port)
        result["operator_api_requests_per_ftj"] = {
            key: round(n / args.count, 2) for key, n in sorted(requests.items())
        }
        result["operator_api_requests_per_ftj_total"] = round(
            sum(requests.values()) / args.count, 2
        )
        result["operator_idle_rss_mib"] = idle.get("VmRSS")
        result["operator_log"] = log_name
        stop_operator(proc)  # the baseline gets the machine to itself, as Graft did
        proc = None
        result["tutorial"] = run_tutorial(args.kubeconfig, args.count, port + 1)
        result["ratios"] = compare(result)
        result["machine"] = machine_facts()
        result["smoke"] = args.smoke
        print(json.dumps(result))
    finally:
        if proc is not None:
            stop_operator(proc)
        if not args.keep:
            delete_namespaces(args.kubeconfig, namespaces)
    return 0


if __name__ == "__main__":
    sys.exit(main())
