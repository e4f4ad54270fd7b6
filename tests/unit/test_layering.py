"""The two dependency worlds stay apart: the API and CLI shell never load the ML stack or kopf."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime_genai", "kopf")


def test_api_crdgen_and_cli_import_no_heavy_package() -> None:
    code = (
        "import sys, graft.api, graft.crdgen, graft.apidoc, graft.manifests, graft.cli\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
