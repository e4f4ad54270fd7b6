"""The trainer's malloc: tcmalloc where it is installed, chosen when the process starts.

glibc's malloc returns freed memory to the system only from the top of its heaps, so a training
step's short-lived activations of many sizes leave the process's peak RSS well above what is
live at any moment. tcmalloc reuses freed spans across sizes: on the SmolLM2-135M shape of
bench/trainer_realistic.py the engine's peak RSS is about 1590 MiB with it against about
2200 MiB with glibc's, at the same speed (bench/README.md). Lowering glibc's mmap threshold
(memory.release_freed_memory) reaches the same RSS at about half the speed.

An allocator is chosen by the dynamic linker when a process starts (LD_PRELOAD), so the
trainer's commands re-execute themselves once, with tcmalloc preloaded, before they import
anything heavy (`restart_with_preferred_allocator`); the processes they start inherit it.
GRAFT_ALLOCATOR picks: unset or `auto` (tcmalloc where installed, else glibc's), `tcmalloc`
(required: exit 2 where it is missing), `system` (glibc's). The trainer image installs Debian's
libtcmalloc-minimal4; metrics.json records the allocator a run had (`run.allocator`).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

ENV_ALLOCATOR = "GRAFT_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
TCMALLOC_FILES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# tcmalloc reports every allocation above 1 GiB on stderr; weights of a large model are such.
QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**50)}


class AllocatorChoiceError(ValueError):
    """GRAFT_ALLOCATOR holds something else than CHOICES, or asks for a missing tcmalloc."""


def find_tcmalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """The path (or linker name) of an installed tcmalloc; None when there is none."""
    for folder in dirs:
        for name in TCMALLOC_FILES:
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def allocator_in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """`tcmalloc` or `jemalloc` when one is mapped into this process, else `system`."""
    try:
        mapped = maps.read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in mapped:
            return name
    return "system"


def preload_environment(
    env: Mapping[str, str], find: Callable[[], str | None] = find_tcmalloc
) -> dict[str, str] | None:
    """The environment to restart in with tcmalloc (as `find` locates it) preloaded; None when
    no restart is due (the choice is `system`, tcmalloc is missing under `auto`, or LD_PRELOAD
    already names it). `find` runs only when a restart may be due: where tcmalloc is missing it
    asks ldconfig, a process of its own."""
    choice = (env.get(ENV_ALLOCATOR) or "auto").strip().lower()
    if choice not in CHOICES:
        raise AllocatorChoiceError(
            f"{ENV_ALLOCATOR}={env.get(ENV_ALLOCATOR)!r}: expected one of {', '.join(CHOICES)}"
        )
    if choice == "system":
        return None
    preload = env.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return None  # asked for already (if the linker could not load it, do not loop)
    tcmalloc = find()
    if tcmalloc is None:
        if choice == "tcmalloc":
            raise AllocatorChoiceError(
                f"{ENV_ALLOCATOR}=tcmalloc, but no tcmalloc library is installed (looked for "
                f"{' or '.join(TCMALLOC_FILES)}; Debian: apt-get install libtcmalloc-minimal4)"
            )
        return None
    restarted = {**QUIET_LARGE_ALLOCATIONS, **env}
    restarted["LD_PRELOAD"] = f"{tcmalloc}:{preload}" if preload else tcmalloc
    return restarted


def restart_with_preferred_allocator() -> None:
    """Re-execute this process (same interpreter and arguments) with tcmalloc preloaded, when
    GRAFT_ALLOCATOR asks for it and it is not loaded yet; returns when no restart is due.
    Only a command's own process calls this, never a library caller (it replaces the process).
    Raises AllocatorChoiceError on a bad GRAFT_ALLOCATOR."""
    env = preload_environment(os.environ)
    if env is None or allocator_in_use() != "system":
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # run on with glibc's malloc rather than not at all
