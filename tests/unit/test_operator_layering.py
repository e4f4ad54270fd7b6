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
