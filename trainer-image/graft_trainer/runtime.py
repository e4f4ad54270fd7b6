"""What the trainer process runs on and with: its peak memory (host and GPU), the versions of
the libraries it uses, and the quieting of those libraries' own progress output."""

from __future__ import annotations

import contextlib
import os
import resource


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def gpu_memory() -> dict[str, int]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "gpuAllocatedBytes": int(torch.cuda.max_memory_allocated()),
        "gpuReservedBytes": int(torch.cuda.max_memory_reserved()),
    }


def quiet_libraries() -> None:
    """Our reporter and logs say what happens; silence per-file progress bars and notices."""
    import warnings

    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")


def environment_summary() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "datasets",
        "tokenizers",
        "sacrebleu",
        "rouge-score",
        "scikit-learn",
        "graft",
    ):
        with contextlib.suppress(Exception):
            out[pkg] = md.version(pkg)
    out["python"] = os.sys.version.split()[0]  # type: ignore[attr-defined]
    return out
