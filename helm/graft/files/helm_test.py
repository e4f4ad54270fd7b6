"""`helm test`: create a suspended FineTuneJob, wait for the operator to reconcile it (its
Validated condition, True or — where a platform policy refuses the test's spec — False with the
reason), delete it. Standard library only; runs in the operator image."""

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount/"
namespace, name = os.environ["GRAFT_TEST_NAMESPACE"], os.environ["GRAFT_TEST_NAME"]
timeout = float(os.environ.get("GRAFT_TEST_TIMEOUT", "60"))
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
host = f"[{host}]" if ":" in host else host
collection = f"https://{host}:{port}/apis/graft.dev/v1alpha1/namespaces/{namespace}/finetunejobs"
context = ssl.create_default_context(cafile=ACCOUNT + "ca.crt")


def call(method, url, body=None):
    with open(ACCOUNT + "token") as f:
        token = f.read().strip()
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def delete():
    try:
        call("DELETE", f"{collection}/{name}")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise


resource = {
    "apiVersion": "graft.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": name, "labels": {"app.kubernetes.io/component": "helm-test"}},
    # Suspended: the operator validates it and launches nothing; no store is read.
    "spec": {
        "suspend": True,
        "model": {"uri": "s3://graft-helm-test/model/"},
        "dataset": {"uri": "s3://graft-helm-test/data.jsonl", "textTemplate": "{text}"},
        "output": {"uri": "s3://graft-helm-test/output/"},
    },
}
delete()  # one left by an interrupted test
call("POST", collection, resource)
print(f"created FineTuneJob {namespace}/{name}; waiting for the operator", flush=True)
try:
    deadline = time.monotonic() + timeout
    while True:
        status = call("GET", f"{collection}/{name}").get("status") or {}
        validated = [c for c in status.get("conditions") or [] if c.get("type") == "Validated"]
        if validated:
            condition = validated[0]
            print(
                f"Validated={condition['status']} ({condition.get('reason')}): "
                f"{condition.get('message')}; phase {status.get('phase')}"
            )
            sys.exit(0)  # the operator answered
        if time.monotonic() > deadline:
            print(
                f"the operator did not reconcile FineTuneJob {namespace}/{name} within "
                f"{timeout:.0f} s: is it running, and does it watch namespace {namespace}?"
            )
            sys.exit(1)
        time.sleep(1)
finally:
    delete()
