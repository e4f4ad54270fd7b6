#!/usr/bin/env python3
"""Operator latency at a burst: N FineTuneJobs created at once; time from create to the trainer
Job appearing, next to a bare API create (N Jobs created directly) in the same run, and the
operator's memory.

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
import sys
import time
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

    async def watch_jobs(ns: str) -> None:
        w = watch.Watch()
        async with w.stream(batch.list_namespaced_job, ns, timeout_seconds=600) as stream:
            async for event in stream:
                if event["type"] == "ADDED":
                    seen.setdefault(f"{ns}/{event['object'].metadata.name}", time.monotonic())

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
                if event["type"] == "ADDED":
                    name = event["object"]["metadata"]["name"]
                    seen.setdefault(f"{ns}/{name}", time.monotonic())

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
        "operator_cpu_seconds_for_burst": round(cpu, 2),
        "operator_rss_mib": memory.get("VmRSS"),
        "operator_peak_rss_mib": memory.get("VmHWM"),
    }


NS_OP = f"bench-op-{uuid.uuid4().hex[:5]}"
NS_BARE = f"bench-bare-{uuid.uuid4().hex[:5]}"


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

    prepare(args.kubeconfig, (NS_OP, NS_BARE))
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
        result["goal"] = {"p50_ms": 300, "p95_ms": 1000, "rss_mib": 150}
        result["operator_log"] = log_name
        result["machine"] = machine_facts()
        result["smoke"] = args.smoke
        print(json.dumps(result))
    finally:
        if proc is not None:
            stop_operator(proc)
        if not args.keep:
            delete_namespaces(args.kubeconfig, (NS_OP, NS_BARE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
