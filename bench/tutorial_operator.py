"""The kopf operator most tutorials lead to: the baseline of bench/operator_latency.py.

One `@kopf.on.create` handler that builds the trainer Job and creates it with a client made for
the event, kopf's defaults otherwise (its progress annotations, a thread per sync handler). It
does a fraction of Graft's work per resource (no validation, status, Events, spec ConfigMap or
identity) and is not part of Graft; it exists to be measured against.

    KUBECONFIG=... python -m kopf run --standalone --namespace NS bench/tutorial_operator.py
"""

from __future__ import annotations

from typing import Any

import kopf
import kubernetes


@kopf.on.create("graft.dev", "v1alpha1", "finetunejobs")
def create_trainer_job(
    spec: Any, name: str, namespace: str, logger: Any, **_: Any
) -> dict[str, str]:
    kubernetes.config.load_kube_config()
    batch = kubernetes.client.BatchV1Api()
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{name}-train"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": dict((spec.get("scheduling") or {}).get("nodeSelector") or {}),
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "graft/trainer:bench",
                            "env": [{"name": "MODEL_URI", "value": spec["model"]["uri"]}],
                        }
                    ],
                }
            },
        },
    }
    kopf.adopt(job)
    batch.create_namespaced_job(namespace=namespace, body=job)
    logger.info("created Job %s-train", name)
    return {"job": f"{name}-train"}
