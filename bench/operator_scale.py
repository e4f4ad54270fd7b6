#!/usr/bin/env python3
"""The operator among many unrelated objects: two operators in the same run, one watching an
empty namespace and one watching a namespace holding 5,000 Pods and ConfigMaps that are not
Graft's (churned while it works); both launch the same FineTuneJobs. Reports each operator's
memory and CPU and the busy/empty ratios: server-side label selectors keep them flat.

    make cluster-up   # or: CLUSTER_MODE=control-plane make cluster-up
    .venv/bin/python bench/operator_scale.py [--objects 5000] [--jobs 20]

The Pods name a scheduler that does not exist, so they stay Pending and cost the cluster
nothing but storage; the ConfigMaps carry 1 KiB each. `--smoke` (40 objects, 2 jobs) is what
`make test` runs; its figures mean nothing. Prints one JSON object. Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_facts
from bench.operator_latency import ftj
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
RUN = uuid.uuid4().hex[:5]
NS_EMPTY, NS_BUSY = f"bench-empty-{RUN}", f"bench-busy-{RUN}"
FILLER = "x" * 1024


def unrelated_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "unrelated"}},
        "spec": {
            "schedulerName": "graft-bench-no-scheduler",  # never scheduled, never run
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "k8s.gcr.io/pause:3.2"}],
        },
    }


def unrelated_configmap(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "unrelated"}},
        "data": {"filler": FILLER},
    }


async def bounded(coros: list[Any], limit: int = 32) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(coro: Any) -> None:
        async with gate:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def fill(kubeconfig: str, count: int) -> float:
    """`count` unrelated objects in the busy namespace, half Pods, half ConfigMaps."""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    async with client.ApiClient(cfg) as api:
        core = client.CoreV1Api(api)
        deadline = time.monotonic() + 60
        while not (await core.list_namespaced_service_account(NS_BUSY)).items:
            if time.monotonic() > deadline:  # pods need the namespace's default account
                raise SystemExit(f"no default ServiceAccount in {NS_BUSY}")
            await asyncio.sleep(0.5)
        start = time.monotonic()
        pods = count // 2
        await bounded(
            [core.create_namespaced_pod(NS_BUSY, unrelated_pod(f"u-{i:05d}")) for i in range(pods)]
            + [
                core.create_namespaced_config_map(NS_BUSY, unrelated_configmap(f"u-{i:05d}"))
                for i in range(count - pods)
            ]
        )
        return time.monotonic() - start


async def workload(kubeconfig: str, jobs: int, churn: int, objects: int) -> float:
    """The same FineTuneJobs in both namespaces, while `churn` updates hit the busy namespace's
    unrelated objects; returns when every FineTuneJob has its Job."""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    async with client.ApiClient(cfg) as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        custom = client.CustomObjectsApi(api)
        start = time.monotonic()

        async def churn_unrelated() -> None:
            updates = []
            for i in range(churn):
                name = f"u-{(i // 2) % max(1, objects // 2):05d}"
                patch = {"metadata": {"annotations": {"graft.dev/bench-churn": str(i)}}}
                if i % 2:
                    updates.append(core.patch_namespaced_config_map(name, NS_BUSY, patch))
                else:
                    updates.append(core.patch_namespaced_pod(name, NS_BUSY, patch))
            await bounded(updates, limit=8)

        async def launch(ns: str) -> None:
            await bounded(
                [
                    custom.create_namespaced_custom_object(
                        "graft.dev", "v1alpha1", ns, "finetunejobs", ftj(f"ftj-{i:03d}", ns)
                    )
                    for i in range(jobs)
                ]
            )

        await asyncio.gather(churn_unrelated(), launch(NS_EMPTY), launch(NS_BUSY))
        deadline = time.monotonic() + 300
        for ns in (NS_EMPTY, NS_BUSY):
            while len((await batch.list_namespaced_job(ns)).items) < jobs:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the operator of {ns} did not launch {jobs} Jobs")
                await asyncio.sleep(0.2)
        return time.monotonic() - start


def ratio(busy: float | None, empty: float | None) -> float | None:
    return round(busy / empty, 3) if busy is not None and empty else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--churn", type=int, default=1000, help="updates of unrelated objects")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after the launches")
    parser.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG", "/tmp/graft-cluster/kubeconfig")
    )
    parser.add_argument("--smoke", action="store_true", help="40 objects, 2 jobs (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args.objects, args.jobs, args.churn, args.settle = 40, 2, 20, 2.0
    args.churn = min(args.churn, args.objects)

    prepare(args.kubeconfig, (NS_EMPTY, NS_BUSY))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        fill_seconds = asyncio.run(fill(args.kubeconfig, args.objects))
        ports = {NS_EMPTY: 19000 + os.getpid() % 500, NS_BUSY: 19500 + os.getpid() % 500}
        logs = {}
        for ns, port in ports.items():
            procs[ns], logs[ns] = start_operator(
                args.kubeconfig,
                ns,
                port,
                GRAFT_PREFLIGHT_POD="false",
                GRAFT_RESYNC_SECONDS="10",  # resyncs (and their watch audits) inside the window
            )
        time.sleep(3)  # initial listings done
        idle = {ns: rss_mib(p.pid) for ns, p in procs.items()}
        cpu_start = {ns: cpu_seconds(p.pid) for ns, p in procs.items()}
        launch_seconds = asyncio.run(workload(args.kubeconfig, args.jobs, args.churn, args.objects))
        time.sleep(args.settle)  # status patches, Events, resyncs (each reads its watches)
        after = {ns: rss_mib(p.pid) for ns, p in procs.items()}
        cpu = {ns: round(cpu_seconds(p.pid) - cpu_start[ns], 2) for ns, p in procs.items()}
        requests = {ns: api_requests(port) for ns, port in ports.items()}
        report = {
            "objects": args.objects,
            "jobs": args.jobs,
            "churned_updates": args.churn,
            "fill_seconds": round(fill_seconds, 1),
            "launch_seconds": round(launch_seconds, 1),
            "operators": {
                label: {
                    "idle_rss_mib": idle[ns].get("VmRSS"),
                    "rss_mib": after[ns].get("VmRSS"),
                    "peak_rss_mib": after[ns].get("VmHWM"),
                    "cpu_seconds": cpu[ns],
                    "api_requests": round(sum(requests[ns].values())),
                    "log": logs[ns],
                }
                for label, ns in (("empty", NS_EMPTY), ("busy", NS_BUSY))
            },
            "smoke": args.smoke,
            "machine": machine_facts(),
        }
        empty, busy = report["operators"]["empty"], report["operators"]["busy"]
        report["busy_over_empty"] = {
            key: ratio(busy[key], empty[key])
            for key in ("idle_rss_mib", "rss_mib", "peak_rss_mib", "cpu_seconds", "api_requests")
        }
        report["goal"] = (
            "busy_over_empty near 1 (flat): memory and CPU do not grow with objects that are not Graft's"
        )
        print(json.dumps(report))
    finally:
        for proc in procs.values():
            stop_operator(proc)
        delete_namespaces(args.kubeconfig, (NS_EMPTY, NS_BUSY))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
