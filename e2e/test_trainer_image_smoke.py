"""A Job in the locally built trainer image imports the ML stack and writes to the S3 server;
the test reads the object back with boto3."""

from __future__ import annotations

import json
import time
import uuid

import pytest

# 1800 s: on a cold machine the fixtures build k8s, debootstrap the base image, fetch wheels
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

SCRIPT = r"""
import json, os, sys
import torch, transformers, peft, onnxruntime_genai, boto3
import graft
body = json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__, "onnxruntime_genai": onnxruntime_genai.__version__,
                   "uid": os.getuid(), "run": os.environ["RUN_ID"]})
boto3.client("s3").put_object(Bucket=os.environ["GRAFT_ARTIFACT_BUCKET"],
                              Key=f"smoke/{os.environ['RUN_ID']}.json", Body=body.encode())
print("uploaded", body)
"""


def test_trainer_image_job_writes_to_s3(full_cluster, s3, trainer_image) -> None:
    from kubernetes import client

    api = full_cluster.api_client()
    batch = client.BatchV1Api(api)
    run_id = uuid.uuid4().hex[:8]
    name = f"smoke-{run_id}"
    env = [client.V1EnvVar(name=k, value=v) for k, v in s3.env().items()]
    env.append(client.V1EnvVar(name="RUN_ID", value=run_id))
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=0,
            ttl_seconds_after_finished=600,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    host_network=True,  # the local cluster has no pod network (see e2e/cluster)
                    security_context=client.V1PodSecurityContext(
                        run_as_user=1000, run_as_group=1000, run_as_non_root=True
                    ),
                    containers=[
                        client.V1Container(
                            name="smoke",
                            image=trainer_image,
                            image_pull_policy="Never",
                            command=["python3", "-c", SCRIPT],
                            env=env,
                        )
                    ],
                )
            ),
        ),
    )
    batch.create_namespaced_job("default", job)
    try:
        deadline = time.monotonic() + 600
        status = None
        while time.monotonic() < deadline:
            status = batch.read_namespaced_job_status(name, "default").status
            if status.succeeded or status.failed:
                break
            time.sleep(2)
        logs = full_cluster.kubectl("logs", f"job/{name}", check=False)
        assert status is not None and status.succeeded == 1, (
            f"job did not succeed: {status}\nlogs:\n{logs.stdout.decode()}{logs.stderr.decode()}"
        )
        assert b"uploaded" in logs.stdout, "kubectl logs works through the loopback kubelet"
        obj = s3.client().get_object(Bucket=s3.bucket, Key=f"smoke/{run_id}.json")
        data = json.loads(obj["Body"].read())
        assert data["run"] == run_id
        assert data["uid"] == 1000
        assert data["torch"].startswith("2.13.0")
    finally:
        batch.delete_namespaced_job(name, "default", propagation_policy="Background")
