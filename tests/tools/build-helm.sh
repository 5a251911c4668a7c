#!/usr/bin/env bash
# Builds a pinned `helm` binary from the Go module proxy into a cache outside the clone (no Docker,
# no release download needed). Prints the path of the binary. A second run reuses it at once.
#   LORA_HELM_VERSION  overrides the pinned version; LORA_CACHE_DIR moves the cache.
set -euo pipefail
version=${LORA_HELM_VERSION:-v3.19.5}
cache=${LORA_CACHE_DIR:-$HOME/.cache/lora-operator}
bin="$cache/helm/$version/helm"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$(dirname "$bin")"
echo "building helm $version into $bin (cold build: several minutes)" >&2
export CGO_ENABLED=0 GOFLAGS=-mod=mod
GOBIN="$(dirname "$bin").partial" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" \
  "helm.sh/helm/v3/cmd/helm@$version"
mv "$(dirname "$bin").partial/helm" "$bin" && rmdir "$(dirname "$bin").partial"
echo "$bin"
