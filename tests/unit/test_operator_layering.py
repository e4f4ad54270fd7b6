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
