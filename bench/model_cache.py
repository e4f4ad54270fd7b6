"""The shared model cache: how long the second job's base-model fetch takes against the first's.

Each "job" is a fresh process, as a trainer pod is, that fetches the model the way the trainer
does (`graft_trainer.sources.fetch_model`) into one cache folder, the claim a platform mounts as
`trainer.modelCache.claim`. The first job finds the cache empty and downloads; the second finds
the entry and only checks it. Three sources, all in the same run:

  s3-artifact  a model Graft wrote (manifest with digests): re-checked against its manifest on
               every read, so the second fetch still hashes every byte
  s3-folder    a model a person uploaded (no manifest): keyed by the objects' sizes and ETags,
               one listing on a hit
  hf           an hf:// model from a local server speaking the Hub's download protocol, through
               huggingface_hub's own cache (HF_HUB_CACHE on the claim): one revision request

    .venv/bin/python bench/model_cache.py [--size-mib 512] [--json out.json] [--smoke]

S3 is the endpoint in AWS_ENDPOINT_URL (with its credentials and GRAFT_ARTIFACT_BUCKET), or a
moto server this script starts on 127.0.0.1. Prints one JSON object: seconds for the first and
second fetch of each source, their ratio, and the machine. `--smoke` (1 MiB; seconds) is what
`make test` runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine_facts  # noqa: E402

# One trainer pod's fetch: the time fetch_model takes, printed as JSON.
FETCH = """
import json, sys, time
from graft.api.base import ModelSource
from graft_trainer import sources
started = time.perf_counter()
path = sources.fetch_model(ModelSource(uri=sys.argv[1]))
seconds = time.perf_counter() - started
size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
print(json.dumps({"seconds": seconds, "bytes": size}))
"""


def model_folder(directory: Path, size: int) -> Path:
    """A base model's files: a config, a tokenizer and `size` bytes of weights in two shards."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    half = size // 2
    for index, part in enumerate((half, size - half)):
        with open(directory / f"model-0000{index + 1}-of-00002.safetensors", "wb") as out:
            for _ in range(part // (1 << 20)):
                out.write(os.urandom(1 << 20))
            out.write(os.urandom(part % (1 << 20)))
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A moto S3 server on a free loopback port, and the environment that reaches it."""
    port = free_port()
    with open(work / "moto.log", "wb") as log:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "GRAFT_ARTIFACT_BUCKET": "bench",
    }
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, env
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"moto_server did not start; see {work / 'moto.log'}")


def job_fetch(uri: str, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", FETCH, uri], capture_output=True, text=True, env=env, cwd=REPO
    )
    if done.returncode != 0:
        raise SystemExit(f"fetch of {uri} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(uri: str, env: dict[str, str]) -> dict[str, Any]:
    first, second = job_fetch(uri, env), job_fetch(uri, env)
    assert first["bytes"] == second["bytes"], (first, second)
    return {
        "bytes": first["bytes"],
        "first_seconds": round(first["seconds"], 4),
        "second_seconds": round(second["seconds"], 4),
        "second_vs_first": round(second["seconds"] / first["seconds"], 4),
        "first_mib_per_second": round(first["bytes"] / first["seconds"] / (1 << 20), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=float, default=512, help="weights size")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--smoke", action="store_true", help="1 MiB; for make test")
    args = parser.parse_args()
    size = int((1 if args.smoke else args.size_mib) * (1 << 20))

    import boto3

    from graft.storage import write_artifact
    from tests.hub_server import HubServer

    work = Path(tempfile.mkdtemp(prefix="graft-bench-cache-"))
    moto = None
    try:
        s3_env = {
            k: os.environ[k]
            for k in (
                "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_REGION",
                "GRAFT_ARTIFACT_BUCKET",
            )
            if os.environ.get(k)
        }
        if "AWS_ENDPOINT_URL" not in s3_env:
            moto, s3_env = start_moto(work)
        bucket = s3_env.get("GRAFT_ARTIFACT_BUCKET", "bench")
        s3_env.setdefault("AWS_REGION", "us-east-1")
        os.environ.update(s3_env)
        client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)

        model = model_folder(work / "model", size)
        run = uuid.uuid4().hex[:8]
        artifact_uri = f"s3://{bucket}/bench-cache/{run}/artifact/"
        write_artifact(model, artifact_uri, {"kind": "model"})
        folder_uri = f"s3://{bucket}/bench-cache/{run}/folder/"
        for path in sorted(model.iterdir()):
            client.upload_file(str(path), bucket, f"bench-cache/{run}/folder/{path.name}")

        with HubServer() as hub:
            hub.publish("bench/model", model)
            results = {}
            for name, uri in (
                ("s3-artifact", artifact_uri),
                ("s3-folder", folder_uri),
                ("hf", "hf://bench/model"),
            ):
                cache = work / f"cache-{name}"  # the claim: empty before the first job
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": str(work),
                    "PYTHONPATH": str(REPO),
                    "GRAFT_CACHE_DIR": str(cache / "graft"),
                    "HF_HUB_CACHE": str(cache / "hub"),
                    "HF_HOME": str(work / "hf-home"),
                    "HF_ENDPOINT": hub.url,
                    "HF_HUB_DISABLE_TELEMETRY": "1",
                    **s3_env,
                }
                results[name] = measure(uri, env)
        report = {
            "benchmark": "model_cache",
            "smoke": args.smoke,
            "size_mib": round(size / (1 << 20), 2),
            "fetch": results,
            "machine": machine_facts(),
        }
        text = json.dumps(report)
        if args.json:
            Path(args.json).write_text(text + "\n")
        for name, r in results.items():
            print(
                f"{name:12s} first {r['first_seconds']:8.3f} s  second {r['second_seconds']:8.3f} s"
                f"  ratio {r['second_vs_first']:.4f}",
                file=sys.stderr,
            )
        print(text)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
