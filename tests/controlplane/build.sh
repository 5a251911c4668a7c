#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kubectl) from the
# pinned go.mod into a cache outside the clone, keyed by Kubernetes version and go.sum.
# Prints the bin directory. A second run with the same key reuses the binaries at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

version=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' go.mod)  # require line, block or not
key=$(sha256sum go.mod go.sum cmd/etcd/main.go build.sh | sha256sum | cut -c1-12)  # build.sh: its ldflags too
cache=${LORA_CACHE_DIR:-$HOME/.cache/lora-operator}
bin="$cache/controlplane/$version-$key"
tools=(etcd kube-apiserver kube-controller-manager kubectl)

complete() { for t in "${tools[@]}"; do [ -x "$bin/$t" ] || return 1; done; }
if complete; then echo "$bin"; exit 0; fi

minor=${version#v1.}; minor=${minor%%.*}
pkg_version() {  # ldflags that make /version and `kubectl version` report the real release
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s -X %s.gitTreeState=clean -X %s.buildDate=%s ' \
      "$p" "$version" "$p" "$p" "$minor" "$p" "$p" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
}
ldflags="-s -w $(pkg_version)"
tmp="$bin.partial"
mkdir -p "$tmp"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
echo "building Kubernetes $version control plane into $bin (cold build: 15-25 min)" >&2
go build -trimpath -ldflags "$ldflags" -o "$tmp/etcd" ./cmd/etcd
for t in kube-apiserver kube-controller-manager kubectl; do
  go build -trimpath -ldflags "$ldflags" -o "$tmp/$t" "k8s.io/kubernetes/cmd/$t"
done
rm -rf "$bin" && mv "$tmp" "$bin"   # appears only when complete
echo "$bin"
