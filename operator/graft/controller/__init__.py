"""The Graft operator (kopf, standalone, one replica).

Layers, each importing only the ones above it:

- `config`     OperatorConfig from the environment.
- `planner`    pure: validated spec -> ConfigMap, Job, trainer identity.
- `status`     pure: spec + Job + pods -> conditions, phase, actions.
- `kube`       the one async API client (aiohttp, kopf's credentials), dicts in and out.
- `reconciler` read -> plan -> act for one resource.
- `workqueue`, `metrics`, `handlers` (kopf wiring), `main` (the process).

Never imports the ML stack (torch, transformers, peft, graft_trainer): see
tests/unit/test_operator_layering.py.
"""
