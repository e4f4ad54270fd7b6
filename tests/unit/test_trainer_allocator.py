"""graft_trainer.allocator: which malloc a trainer command restarts under, from GRAFT_ALLOCATOR,
LD_PRELOAD and what is installed, and how it tells which one a process has."""

from __future__ import annotations

from pathlib import Path

import pytest

from graft_trainer import allocator
from graft_trainer.allocator import AllocatorChoiceError, preload_environment

LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_auto_preloads_an_installed_tcmalloc_and_quiets_its_large_allocation_reports() -> None:
    env = preload_environment({"PATH": "/bin"}, lambda: LIB)
    assert env is not None
    assert env["LD_PRELOAD"] == LIB and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40
    # a threshold the user set stays theirs
    env = preload_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1024"}, lambda: LIB)
    assert env is not None and env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "1024"


def test_a_preload_already_there_is_kept_behind_tcmalloc() -> None:
    env = preload_environment(
        {"LD_PRELOAD": "/opt/libhook.so", "GRAFT_ALLOCATOR": "auto"}, lambda: LIB
    )
    assert env is not None and env["LD_PRELOAD"] == f"{LIB}:/opt/libhook.so"


def test_no_restart_when_asked_for_glibc_when_missing_or_when_already_preloaded() -> None:
    def not_looked_up() -> str:
        raise AssertionError("no library lookup (ldconfig) when no restart can be due")

    assert preload_environment({"GRAFT_ALLOCATOR": "system"}, not_looked_up) is None
    assert preload_environment({"GRAFT_ALLOCATOR": " System "}, not_looked_up) is None
    assert preload_environment({}, lambda: None) is None  # auto: glibc's where tcmalloc is missing
    # the restarted process itself, and one whose linker could not load it: no loop
    assert preload_environment({"LD_PRELOAD": LIB}, not_looked_up) is None


def test_a_required_tcmalloc_that_is_missing_and_a_bad_choice_are_refused_by_name() -> None:
    with pytest.raises(
        AllocatorChoiceError, match=r"GRAFT_ALLOCATOR=tcmalloc.*libtcmalloc-minimal4"
    ):
        preload_environment({"GRAFT_ALLOCATOR": "tcmalloc"}, lambda: None)
    with pytest.raises(AllocatorChoiceError) as bad:
        preload_environment({"GRAFT_ALLOCATOR": "jemalloc"}, lambda: LIB)
    assert str(bad.value) == "GRAFT_ALLOCATOR='jemalloc': expected one of auto, tcmalloc, system"


def test_find_tcmalloc_looks_in_the_library_folders(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    assert allocator.find_tcmalloc((str(tmp_path / "none"),)) in (None, *allocator.TCMALLOC_FILES)
    (lib / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc((str(lib),)) == str(lib / "libtcmalloc.so.4")
    (lib / "libtcmalloc_minimal.so.4").write_bytes(b"")  # the minimal build is preferred
    assert allocator.find_tcmalloc((str(lib),)) == str(lib / "libtcmalloc_minimal.so.4")


def test_allocator_in_use_reads_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(f"7f00-7f01 r-xp 00000000 08:01 42 {LIB}\n7f02-7f03 r-xp /usr/lib/libc.so.6\n")
    assert allocator.allocator_in_use(maps) == "tcmalloc"
    maps.write_text("7f02-7f03 r-xp 00000000 08:01 43 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.allocator_in_use(maps) == "system"
    assert allocator.allocator_in_use(tmp_path / "absent") == "system"
