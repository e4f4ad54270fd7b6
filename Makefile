# Graft: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= .venv/bin/python
VENV_STAMP := .venv/.graft-installed
EXTRAS ?= operator,trainer,bench,dev

.PHONY: help venv lint fmt crds lock test test-unit test-integration test-e2e demo

help:
	@echo "make demo   - the quickstart chain on the local cluster"
	@echo "make test   - lint, then unit + integration + e2e tests"
	@echo "make lint | crds | lock | test-unit | test-integration | test-e2e | cluster-up | cluster-down"

# The project venv. uv ignores pip's configuration, so pip's find-links (where these
# machines keep the CPU build of torch) is handed to it explicitly when set. Bytecode is
# compiled once here: where PYTHONDONTWRITEBYTECODE is set, every Python process the tests
# start would otherwise compile torch, transformers and peft again (15 s -> 6.5 s an import).
$(VENV_STAMP): pyproject.toml
	@command -v uv >/dev/null || python3 -m pip install --quiet uv
	@[ -x $(PY) ] || uv venv --quiet --python python3 .venv
	UV_FIND_LINKS="$${PIP_FIND_LINKS:-$$(python3 -m pip config get global.find-links 2>/dev/null)}" \
	  uv pip install --quiet --compile-bytecode --python $(PY) -e ".[$(EXTRAS)]"
	@# tcmalloc, which the trainer restarts under (graft_trainer/allocator.py), where root can
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || [ "$$(id -u)" != 0 ] \
	  || { apt-get update -q && apt-get install -y -q --no-install-recommends libtcmalloc-minimal4; } \
	  >/dev/null || echo "note: libtcmalloc-minimal4 is missing: the trainer uses glibc's malloc"
	@touch $@

venv: $(VENV_STAMP)

lint: venv
	$(PY) -m ruff check operator trainer-image tests e2e bench tools
	$(PY) -m ruff format --check operator trainer-image tests e2e bench tools
	$(PY) -m mypy operator/graft
	$(PY) -m graft.cli crds --check
	$(PY) -m graft.cli docs --check
	$(PY) tools/lock.py --check

fmt: venv
	$(PY) -m ruff format operator trainer-image tests e2e bench tools
	$(PY) -m ruff check --fix operator trainer-image tests e2e bench tools

crds: venv
	$(PY) -m graft.cli crds
	$(PY) -m graft.cli docs
	$(PY) -m graft.argocd
	$(PY) -m graft.chart_values
	$(PY) -m graft.cli crds --out helm/graft/files/crds

# requirements.lock, the exact versions both images install, from pyproject.toml (uv and the
# package index; pins that still fit are kept, LOCK_ARGS=--upgrade moves them to the newest).
lock: venv
	$(PY) tools/lock.py $(LOCK_ARGS)

test: lint
	$(PY) -m pytest tests e2e

test-unit: venv
	$(PY) -m pytest tests/unit

test-integration: venv
	$(PY) -m pytest -m integration tests

test-e2e: venv
	$(PY) -m pytest -m e2e e2e

# The quickstart on the local cluster (see e2e/demo.py): cluster, images, helm install,
# seeded store, a FineTuneJob trained with live progress, artifacts and metrics.
demo: venv
	$(PY) e2e/demo.py

include e2e/cluster/cluster.mk
