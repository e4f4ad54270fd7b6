#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl
# v1.20.2 from Debian's `kubernetes` source package into $1 (the cache dir), plus the
# static pause binary. Skips everything if the binaries are already there.
set -euo pipefail
OUT=${1:?usage: build-k8s.sh CACHE_DIR}
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl pause)
mkdir -p "$OUT"
# One build at a time per cache (several test sessions may share a machine).
exec 9>"$OUT/.build.lock"
flock 9
done_all=1
for b in "${BINS[@]}"; do [ -x "$OUT/bin/$b" ] || done_all=0; done
if [ "$done_all" = 1 ]; then echo "k8s binaries cached in $OUT/bin"; exit 0; fi

mkdir -p "$OUT/src" "$OUT/bin"
cd "$OUT/src"
if ! ls kubernetes_*.dsc >/dev/null 2>&1; then
  apt-get source --download-only kubernetes
fi
DSC=$(ls kubernetes_*.dsc | head -n1)
TREE=$OUT/src/tree
if [ ! -f "$TREE/.graft-extracted" ]; then
  rm -rf "$TREE"
  dpkg-source --no-check -x "$DSC" "$TREE"
  touch "$TREE/.graft-extracted"
fi
cd "$TREE"
# Go 1.19 vs vendored reflect2 1.0.1 crashes the apiserver on CR writes: use Debian's 1.0.2.
if [ ! -f vendor/github.com/modern-go/reflect2/.graft-swapped ]; then
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  rm -f vendor/github.com/modern-go/reflect2/go.mod vendor/github.com/modern-go/reflect2/go.sum
  touch vendor/github.com/modern-go/reflect2/.graft-swapped
fi
mkdir -p .go/src/k8s.io
[ -e .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
mkdir -p "$OUT/home"
cd .go/src/k8s.io/kubernetes
env GOPATH="$TREE/.go" GO111MODULE=off CGO_ENABLED=0 HOME="$OUT/home" GOCACHE="$OUT/gocache" \
  GOFLAGS= make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl"
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
  install -m 0755 "_output/local/bin/linux/amd64/$b" "$OUT/bin/$b.tmp"
  mv "$OUT/bin/$b.tmp" "$OUT/bin/$b"
done
gcc -Os -static -o "$OUT/bin/pause.tmp" build/pause/linux/pause.c
mv "$OUT/bin/pause.tmp" "$OUT/bin/pause"
echo "built: $(ls "$OUT/bin")"
