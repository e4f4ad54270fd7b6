# Local Kubernetes cluster + S3 server for tests and the demo (see e2e/cluster/README.md).
# Included by the main Makefile; standalone: make -f e2e/cluster/cluster.mk cluster-up
PY ?= .venv/bin/python
LOCALCLUSTER ?= $(PY) e2e/cluster/localcluster.py
CLUSTER_MODE ?= full
CLUSTER_ARGS ?=

.PHONY: cluster-up cluster-down cluster-status image-base image-trainer image-trainer-cuda image-operator

cluster-up: ## start the local cluster (full mode: node, images, S3); reuses ~/.cache/graft
	$(LOCALCLUSTER) up --mode $(CLUSTER_MODE) $(CLUSTER_ARGS)

cluster-down: ## stop every process cluster-up started (by PID); keeps the caches
	$(LOCALCLUSTER) down $(CLUSTER_ARGS)

cluster-status: ## show the components, their PIDs and health
	$(LOCALCLUSTER) status $(CLUSTER_ARGS)

image-base: ## import the debootstrap base image into the cluster's dockerd
	$(LOCALCLUSTER) image-base $(CLUSTER_ARGS)

image-trainer: ## build graft/trainer:dev from trainer-image/Dockerfile on the local base image
	$(LOCALCLUSTER) image-trainer $(CLUSTER_ARGS)

image-trainer-cuda: ## the same with torch's CUDA build from PyPI: graft/trainer:dev-cuda (GBs)
	$(LOCALCLUSTER) image-trainer-cuda $(CLUSTER_ARGS)

image-operator: ## build graft/operator:dev from operator/Dockerfile on the local base image
	$(LOCALCLUSTER) image-operator $(CLUSTER_ARGS)
