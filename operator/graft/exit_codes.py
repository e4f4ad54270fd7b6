"""The trainer's exit codes: the part of the operator-trainer contract the kubelet carries.

The trainer exits with one of these; the operator reads it from the pod's container status and
decides (`controller.pods.failure_summary`) whether the attempt is retried and which reason the
resource shows.
"""

EXIT_OK = 0
# Anything else that went wrong (a crash, a store outage): retried up to spec.backoffLimit.
EXIT_FAILURE = 1
# The spec or the data is wrong: a retry reads the same input. Not retried; InvalidInput.
EXIT_INVALID_INPUT = 2
# A stored file differs from its manifest's digest, or an object key escapes its folder: the
# store cannot be trusted, and a retry reads the same bytes. Not retried; IntegrityCheckFailed.
EXIT_UNTRUSTED_STORAGE = 3
# A multi-node job (spec.resources.nodes > 1) lost a training process in another pod (that
# pod failed, or was deleted, evicted or preempted) while this one waited on it: the operator
# restarts every pod of the attempt; this pod's exit is not counted toward backoffLimit (the
# pod that failed is, when it failed by the trainer's fault).
EXIT_PEER_LOST = 4
# Stopped on SIGTERM (the pod is being deleted) after saving a checkpoint: 128 + 15, as a shell
# reports it. Retried like any failure when the pod was not being deleted.
EXIT_PREEMPTED = 143

# Exit codes that end the resource at once instead of starting another pod.
NOT_RETRIED = frozenset({EXIT_INVALID_INPUT, EXIT_UNTRUSTED_STORAGE})
