"""One rank of a data-parallel FineTuneJob (graft_trainer.parallel starts one process per
rank as `python -m graft_trainer.parallel_worker DOC URI REPORTER WORK_DIR RESULT`): run the
resource; rank 0 leaves how its run ended (exit code, message, outcome) in RESULT for the launcher.
A process whose collective failed because another process went away exits 4 (EXIT_PEER_LOST)
at once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from graft.exit_codes import EXIT_PEER_LOST
from graft_trainer import outcome
from graft_trainer.__main__ import run_resource
from graft_trainer.errors import EXIT_FAILURE, one_line
from graft_trainer.parallel import peer_lost, rank
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
        if peer_lost(exc):  # another process went away: its pod failed or was deleted
            message = f"lost a training process of another pod ({one_line(exc)[:200]})"
            end = outcome.failed(document, EXIT_PEER_LOST, message)
        else:
            end = outcome.failed(document, EXIT_FAILURE, f"{type(exc).__name__}: {one_line(exc)}")
    if is_main:
        Path(result_path).write_text(end.to_json())
    if end.code == EXIT_PEER_LOST:
        print(f"error: training process {rank()}: {end.message}", file=sys.stderr)
        # at once: tearing down a process group whose peer is gone can block
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(end.code)
    return end.code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
