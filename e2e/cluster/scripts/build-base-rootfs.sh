#!/usr/bin/env bash
# debootstrap a minimal Debian bookworm with python3 (and tcmalloc, which the trainer restarts
# under: graft_trainer/allocator.py) into a cached tarball ($1).
# The mirror is read from the machine's apt configuration at run time.
set -euo pipefail
TARBALL=${1:?usage: build-base-rootfs.sh TARBALL}
mkdir -p "$(dirname "$TARBALL")"
exec 9>"$TARBALL.lock"
flock 9
if [ -s "$TARBALL" ]; then echo "base rootfs cached: $TARBALL"; exit 0; fi
MIRROR=$(python3 - <<'PY'
import pathlib
for s in pathlib.Path("/etc/apt/sources.list.d/debian.sources").read_text().split("\n\n"):
    f = dict(l.split(":", 1) for l in s.splitlines() if ":" in l and not l.lstrip().startswith("#"))
    if "bookworm" in f.get("Suites", "").split() and f.get("Types", "").strip() == "deb":
        print(f["URIs"].split()[0]); break
PY
)
[ -n "$MIRROR" ] || { echo "cannot read the Debian mirror from apt sources" >&2; exit 1; }
ROOTFS=$(dirname "$TARBALL")/rootfs.tmp
rm -rf "$ROOTFS"; mkdir -p "$ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libtcmalloc-minimal4 bookworm "$ROOTFS" "$MIRROR"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.tmp" .
mv "$TARBALL.tmp" "$TARBALL"
rm -rf "$ROOTFS"
echo "base rootfs: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
