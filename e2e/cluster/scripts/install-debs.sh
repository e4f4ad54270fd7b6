#!/usr/bin/env bash
# Install the Debian packages the local cluster needs, and add a deb-src entry for the
# main Debian suite (copied from the machine's own apt configuration, so no mirror host
# is ever written into the repository). Idempotent.
set -euo pipefail
PKGS=(golang-go rsync jq make gcc libc6-dev dpkg-dev openssl
      golang-github-modern-go-reflect2-dev etcd-server docker.io debootstrap)
SRC_FILE=/etc/apt/sources.list.d/graft-deb-src.sources

need_update=0
if [ ! -f "$SRC_FILE" ]; then
  python3 - "$SRC_FILE" <<'PY'
import pathlib, sys
src = pathlib.Path("/etc/apt/sources.list.d/debian.sources")
stanzas = [s for s in src.read_text().split("\n\n") if s.strip()]
out = []
for s in stanzas:
    lines = [l for l in s.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    fields = dict(l.split(":", 1) for l in lines if ":" in l)
    suites = fields.get("Suites", "").split()
    if "bookworm" in suites and "Types" in fields:
        out.append("\n".join("Types: deb-src" if l.startswith("Types:") else l for l in lines))
        break
if not out:
    sys.exit("no stanza for the main bookworm suite in " + str(src))
pathlib.Path(sys.argv[1]).write_text("\n\n".join(out) + "\n")
PY
  echo "wrote $SRC_FILE"
  need_update=1
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "$need_update" = 1 ] || [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "debian packages ok"
