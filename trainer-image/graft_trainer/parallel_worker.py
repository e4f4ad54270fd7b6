"""One rank of a data-parallel FineTuneJob (graft_trainer.parallel starts one process per
rank as `python -m graft_trainer.parallel_worker DOC URI REPORTER WORK_DIR RESULT`): run the
resource; rank 0 leaves how its run ended (exit code, message, outcome) in RESULT for the launcher."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from graft_trainer import outcome
from graft_trainer.__main__ import run_resource
from graft_trainer.errors import EXIT_FAILURE, one_line
from graft_trainer.parallel import rank
from graft_trainer.reporting import setup_logging


def main(argv: list[str]) -> int:
    """One rank: run the resource; rank 0 leaves its result for the launcher."""
    doc_path, artifacts_uri, reporter_name, work_dir, result_path = argv
    setup_logging(json_lines=os.environ.get("GRAFT_LOG_FORMAT", "json") == "json")
    document = json.loads(Path(doc_path).read_text())
    is_main = rank() == 0
    try:
        end = run_resource(
            document,
            artifacts_uri,
            (reporter_name or None) if is_main else "none",
            work_dir=Path(work_dir) if work_dir and is_main else None,
        )
    except Exception as exc:  # the launcher reports rank 0's reason, not a traceback
        end = outcome.failed(document, EXIT_FAILURE, f"{type(exc).__name__}: {one_line(exc)}")
    if is_main:
        Path(result_path).write_text(end.to_json())
    return end.code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
