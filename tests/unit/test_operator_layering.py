"""The operator never loads the ML stack, and its CLI entry stays lazy."""

from __future__ import annotations

import subprocess
import sys

ML = ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime_genai", "graft_trainer")


def test_operator_imports_no_ml_package() -> None:
    code = (
        "import sys, graft.controller.main, graft.controller.handlers, graft.controller.status\n"
        f"print(','.join(m for m in {ML!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_planner_and_status_are_pure() -> None:
    code = (
        "import sys, graft.controller.planner, graft.controller.status\n"
        "print(','.join(m for m in ('kopf', 'kubernetes_asyncio', 'aiohttp') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_planning_a_study_needs_no_optuna() -> None:
    """The operator image has no optuna: trial pods ask it; the operator only counts."""
    code = (
        "import sys, json\n"
        "from graft.controller.study import plan_study\n"
        "spec = {'search': {'trials': 3, 'space': {'lora.r': {'type': 'choice', 'values': [4, 8]}}}}\n"
        "plan = plan_study(spec, 's3://b/p/', None, [], 1, 'j')\n"
        "assert plan.launch == [0], plan.launch\n"
        "print(','.join(m for m in ('optuna', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


# Where the operator image's Python cannot import the trainer's world: a finder that refuses it.
WITHOUT_TRAINER = (
    "import sys, importlib.abc\n"
    "class Absent(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {ML!r}:\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Absent())\n"
    "from graft.cli import main\n"
)


def graft_cli(argv: list[str], *, trainer: bool) -> subprocess.CompletedProcess[str]:
    prelude = "import sys\nfrom graft.cli import main\n" if trainer else WITHOUT_TRAINER
    code = prelude + f"sys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_operator_image_offers_only_commands_it_can_run() -> None:
    offered = graft_cli(["--help"], trainer=False)
    assert offered.returncode == 0, offered.stderr
    assert "{crds,docs,validate,operator}" in offered.stdout, offered.stdout
    for command in ("crds", "docs", "validate"):
        result = graft_cli([command, "--help"], trainer=False)
        assert result.returncode == 0 and "usage: graft" in result.stdout, result.stderr
    # the operator parses its own flags (kopf's world, present in the operator image)
    result = graft_cli(["operator", "--help"], trainer=False)
    assert result.returncode == 0, result.stderr
    refused = graft_cli(["run", "x.yaml"], trainer=False)
    assert refused.returncode == 2 and "invalid choice: 'run'" in refused.stderr
    # with the trainer package, the local commands are there
    for command in ("run", "preflight", "testkit"):
        result = graft_cli([command, "--help"], trainer=True)
        assert result.returncode == 0 and f"usage: graft {command}" in result.stdout, result.stderr
