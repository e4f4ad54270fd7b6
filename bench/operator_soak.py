#!/usr/bin/env python3
"""Soak: up to 500 FineTuneJobs churned for 30 minutes (created, resumed, suspended, deleted and
created again), the operator's memory and the entries it keeps per resource sampled throughout.
Memory must level off (the slope over the last third of the run is reported) and, once every
resource is deleted, no per-resource entry may remain.

    make cluster-up
    .venv/bin/python bench/operator_soak.py [--resources 500] [--minutes 30]

Resources are created suspended and resumed later; a resumed one gets its Job and a pod that
stays Pending (a node selector no node has), so the churn costs the kubelet nothing. `--smoke`
(10 resources, 15 s, a sample every 2 s) is what `make test` runs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_facts
from bench.operator_latency import ftj
from bench.operator_process import (
    delete_namespaces,
    prepare,
    rss_mib,
    start_operator,
    stop_operator,
)

REPO = Path(__file__).resolve().parents[1]
NS = f"bench-soak-{uuid.uuid4().hex[:5]}"
GROUP, VERSION, PLURAL = "graft.dev", "v1alpha1", "finetunejobs"


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("graft_tracked_entries{"):
            name = line.split('map="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("graft_reconcile_total{") and 'result="error"' in line:
            out["reconcile_errors"] = out.get("reconcile_errors", 0) + float(line.rsplit(" ", 1)[1])
    return out


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


class Churn:
    """Random create / resume / suspend / delete actions against one namespace."""

    def __init__(self, api: Any, limit: int, seed: int = 0) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.limit = limit
        self.rng = random.Random(seed)
        self.live: dict[str, bool] = {}  # name -> suspended
        self.serial = 0
        self.actions: dict[str, int] = {"create": 0, "resume": 0, "suspend": 0, "delete": 0}

    def _create(self) -> None:
        name = f"soak-{self.serial:05d}"
        self.serial += 1
        body = ftj(name, NS)
        body["spec"]["suspend"] = True
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
        self.live[name] = True

    def _patch(self, name: str, suspend: bool) -> None:
        patch = {"spec": {"suspend": suspend}}
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, patch)
        self.live[name] = suspend

    def _delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
        del self.live[name]

    def step(self) -> None:
        if len(self.live) < self.limit * 0.8:
            action = "create"
        else:
            action = self.rng.choice(["create", "resume", "suspend", "delete", "delete"])
            if action == "create" and len(self.live) >= self.limit:
                action = "delete"
        names = sorted(self.live)
        if action == "create":
            self._create()
        elif action == "delete":
            self._delete(self.rng.choice(names))
        else:
            suspend = action == "suspend"
            candidates = [n for n in names if self.live[n] != suspend]
            if not candidates:
                return
            self._patch(self.rng.choice(candidates), suspend)
        self.actions[action] += 1

    def delete_all(self) -> None:
        for name in sorted(self.live):
            self._delete(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resources", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=5.0, help="churn actions per second")
    parser.add_argument("--sample-seconds", type=float, default=15.0)
    parser.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG", "/tmp/graft-cluster/kubeconfig")
    )
    parser.add_argument("--smoke", action="store_true", help="10 resources, 15 s")
    args = parser.parse_args()
    if args.smoke:
        args.resources, args.minutes, args.sample_seconds = 10, 15 / 60, 2.0

    from kubernetes import config

    prepare(args.kubeconfig, (NS,))
    port = 20000 + os.getpid() % 1000
    proc = None
    try:
        proc, log_name = start_operator(
            args.kubeconfig,
            NS,
            port,
            GRAFT_PREFLIGHT_POD="false",
            GRAFT_RESYNC_SECONDS="5" if args.smoke else "15",
        )
        churn = Churn(config.new_client_from_config(config_file=args.kubeconfig), args.resources)
        samples: list[dict[str, Any]] = []
        start = time.monotonic()
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                memory = rss_mib(proc.pid)
                samples.append(
                    {
                        "t": round(time.monotonic() - start, 1),
                        "rss_mib": memory.get("VmRSS"),
                        "live": len(churn.live),
                        **scrape(port),
                    }
                )
                stop.wait(args.sample_seconds)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        end = start + args.minutes * 60
        while time.monotonic() < end:
            churn.step()
            time.sleep(1 / args.rate)
        live_at_end = len(churn.live)
        stop.set()
        sampler.join(30)
        tracked_live = scrape(port)
        churn.delete_all()
        # The resync (every GRAFT_RESYNC_SECONDS) reconciles each gone resource once more.
        settle_deadline = time.monotonic() + 120
        while True:
            after = scrape(port)
            per_resource = {
                k: v for k, v in after.items() if k not in ("reconcile_errors", "failures")
            }
            if all(v == 0 for v in per_resource.values()) or time.monotonic() > settle_deadline:
                break
            time.sleep(2)
        third = [(s["t"], s["rss_mib"]) for s in samples if s["t"] >= (end - start) * 2 / 3]
        first = [s["rss_mib"] for s in samples if s["t"] <= (end - start) / 3]
        report = {
            "resources": args.resources,
            "minutes": round(args.minutes, 2),
            "actions": churn.actions,
            "resources_created": churn.serial,
            "live_at_end": live_at_end,
            "rss_mib_first_third_mean": round(sum(first) / len(first), 1) if first else None,
            "rss_mib_last_third_mean": (
                round(sum(v for _, v in third) / len(third), 1) if third else None
            ),
            "rss_slope_mib_per_minute_last_third": round(slope_per_minute(third), 3),
            "rss_mib_peak": rss_mib(proc.pid).get("VmHWM"),
            "tracked_with_live_resources": tracked_live,
            "tracked_after_deleting_all": after,
            "samples": samples,
            "operator_log": log_name,
            "smoke": args.smoke,
            "machine": machine_facts(),
        }
        print(json.dumps(report))
    finally:
        if proc is not None:
            stop_operator(proc)
        delete_namespaces(args.kubeconfig, (NS,))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
