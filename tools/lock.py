#!/usr/bin/env python3
"""requirements.lock: the exact versions the operator and trainer images install.

    python tools/lock.py            # rewrite it with uv (`make lock`), keeping pins that still fit
    python tools/lock.py --upgrade  # move every pin to the newest release that fits
    python tools/lock.py --check    # offline, in a second: fail when pyproject.toml changed since

The lock is `uv pip compile --universal` of the core dependencies, the `operator` and `trainer`
extras and the build's own requirements (`[build-system] requires`), resolved against the
package index alone: torch is PyPI's build, the CUDA one on Linux, with its nvidia-* runtime
pinned too. A CPU image installs the CPU build of the same version (`torch==2.13.0` matches
`2.13.0+cpu`), and the nvidia-* lines then go unused. The Dockerfiles install with
`pip install -c requirements.lock`, so every package lands at the version pinned here.

`--check` recomputes the digest of those requirements from pyproject.toml and compares it with
the one the lock records, then checks that every requirement is met by a pin (a hand edit).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
EXTRAS = ("operator", "trainer")
PYTHON = "3.11"
DIGEST_PREFIX = "# inputs-sha256: "
# The environment of both images, where --check evaluates markers.
IMAGE_ENV = {
    "python_version": PYTHON,
    "python_full_version": f"{PYTHON}.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
HEADER = """\
# Exact versions of what the operator and trainer images install (pip install -c this file):
# pyproject.toml's core dependencies, its `operator` and `trainer` extras and the build's
# setuptools, resolved for Python 3.11+ on any platform. torch is PyPI's build of the pinned
# version, the CUDA one on Linux, with its CUDA runtime (nvidia-*, cuda-*) pinned as well; a
# CPU image takes the CPU build of the same version and leaves those lines unused.
# Do not edit: `make lock` rewrites it (keeping the pins that still fit; `make lock
# LOCK_ARGS=--upgrade` moves them all to the newest), and `make lint` fails once
# pyproject.toml's requirements differ from the ones this file was made from.
"""


def lock_inputs(pyproject_text: str) -> list[str]:
    """The requirements the lock is made from, normalised and sorted (order, spacing and
    comments in pyproject.toml do not count)."""
    doc = tomllib.loads(pyproject_text)
    proj = doc["project"]
    reqs = list(proj.get("dependencies", []))
    for extra in EXTRAS:
        reqs += proj.get("optional-dependencies", {}).get(extra, [])
    reqs += doc.get("build-system", {}).get("requires", [])
    return sorted({str(Requirement(r)) for r in reqs})


def inputs_digest(inputs: list[str]) -> str:
    return hashlib.sha256(("\n".join(inputs) + f"\npython>={PYTHON}\n").encode()).hexdigest()


def recorded_digest(lock_text: str) -> str | None:
    for line in lock_text.splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line.removeprefix(DIGEST_PREFIX).strip()
    return None


def parse_pins(lock_text: str) -> dict[str, list[tuple[str, Marker | None]]]:
    """name -> [(version, marker)] for each `name==version [; marker]` line."""
    pins: dict[str, list[tuple[str, Marker | None]]] = {}
    for line in lock_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==":
            raise ValueError(f"not an exact pin: {line!r}")
        pins.setdefault(canonicalize_name(req.name), []).append((spec[0].version, req.marker))
    return pins


def check(pyproject_text: str, lock_text: str) -> list[str]:
    """What is wrong with the lock for this pyproject.toml (nothing: an empty list)."""
    problems: list[str] = []
    inputs = lock_inputs(pyproject_text)
    got = recorded_digest(lock_text)
    if got is None:
        problems.append(f"no '{DIGEST_PREFIX.strip()}' line")
    elif got != inputs_digest(inputs):
        problems.append("pyproject.toml's requirements changed since the lock was made")
    try:
        pins = parse_pins(lock_text)
    except ValueError as e:
        return [*problems, str(e)]
    for line in inputs:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        versions = [
            v
            for v, m in pins.get(canonicalize_name(req.name), [])
            if m is None or m.evaluate(IMAGE_ENV)
        ]
        if not any(req.specifier.contains(v, prereleases=True) for v in versions):
            problems.append(f"{line}: pinned {versions or 'nowhere'}")
    for v, _ in pins.get("torch", []):
        if Version(v).local:
            problems.append(f"torch=={v}: a local build, not the index's (UV_FIND_LINKS set?)")
    return problems


def write(upgrade: bool = False) -> None:
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("tools/lock.py: uv is not on PATH (make venv installs it)")
    pyproject = (REPO / "pyproject.toml").read_text()
    doc = tomllib.loads(pyproject)
    build_reqs = doc.get("build-system", {}).get("requires", [])
    # The index alone: a find-links folder holding a CPU torch would pin `torch==...+cpu`.
    env = {k: v for k, v in os.environ.items() if k != "UV_FIND_LINKS"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "requirements.lock"
        if LOCK.exists() and not upgrade:
            shutil.copy(LOCK, out)  # uv keeps the pins of an existing output that still fit
        cmd = [uv, "pip", "compile", "pyproject.toml", "-"]
        cmd += [a for e in EXTRAS for a in ("--extra", e)]
        cmd += ["--universal", "--python-version", PYTHON, "--no-header", "--quiet", "-o", str(out)]
        if upgrade:
            cmd.append("--upgrade")
        subprocess.run(
            cmd, cwd=REPO, env=env, input="\n".join(build_reqs) + "\n", text=True, check=True
        )
        body = out.read_text()
    body = "\n".join(ln for ln in body.splitlines() if not ln.startswith("#")) + "\n"
    body = re.sub(r"\A\n+", "", body)
    digest = inputs_digest(lock_inputs(pyproject))
    text = f"{HEADER}{DIGEST_PREFIX}{digest}\n{body}"
    problems = check(pyproject, text)
    if problems:
        raise SystemExit("tools/lock.py: the new lock is wrong:\n  " + "\n  ".join(problems))
    LOCK.write_text(text)
    print(f"wrote {LOCK.relative_to(REPO)}: {sum(len(v) for v in parse_pins(text).values())} pins")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail when the lock is stale")
    ap.add_argument("--upgrade", action="store_true", help="newest versions that fit")
    a = ap.parse_args(argv)
    if not a.check:
        write(a.upgrade)
        return 0
    if not LOCK.exists():
        print("requirements.lock is missing: run `make lock`", file=sys.stderr)
        return 1
    problems = check((REPO / "pyproject.toml").read_text(), LOCK.read_text())
    if problems:
        print("requirements.lock is stale: run `make lock` and commit it", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("requirements.lock: up to date with pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
