#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kubectl) from the
# pinned go.mod into a cache outside the clone, keyed by Kubernetes version, module graph and ldflags.
# Prints the bin directory. A second run with the same key reuses the binaries at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

version=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' go.mod)  # require line, block or not
minor=${version#v1.}; minor=${minor%%.*}
version_flags() {  # ldflags that make /version and `kubectl version` report the real release
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s -X %s.gitTreeState=clean ' \
      "$p" "$version" "$p" "$p" "$minor" "$p"
  done
}
ldflags="-s -w $(version_flags)"
key=$( (cat go.mod go.sum cmd/etcd/main.go; echo "$ldflags") | sha256sum | cut -c1-12)
cache=${LORA_CACHE_DIR:-$HOME/.cache/lora-operator}
bin="$cache/controlplane/$version-$key"
tools=(etcd kube-apiserver kube-controller-manager kubectl)

complete() { for t in "${tools[@]}"; do [ -x "$bin/$t" ] || return 1; done; }
if complete; then echo "$bin"; exit 0; fi

# One build at a time (CI and test fixtures may start together); the loser finds the result ready.
mkdir -p "$cache/controlplane"
exec 9>"$cache/controlplane/.build.lock"
flock 9
if complete; then echo "$bin"; exit 0; fi

tmp=$(mktemp -d "$bin.partial.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export CGO_ENABLED=0 GOFLAGS=-mod=mod
echo "building Kubernetes $version control plane into $bin (cold build: about 10 min on 2 cores)" >&2
go build -trimpath -ldflags "$ldflags" -o "$tmp/etcd" ./cmd/etcd
for t in kube-apiserver kube-controller-manager kubectl; do
  go build -trimpath -ldflags "$ldflags" -o "$tmp/$t" "k8s.io/kubernetes/cmd/$t"
done
rm -rf "$bin" && mv "$tmp" "$bin"   # appears only when complete
echo "$bin"
