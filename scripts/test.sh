#!/usr/bin/env bash
# Runs the whole test suite: unit, trainer, integration and end-to-end tiers.
# Integration and e2e tests start their own services (etcd, kube-apiserver, kube-controller-manager, the
# node agent, SeaweedFS, Prometheus, Pushgateway) on 127.0.0.1; scripts/test-services.sh installs them.
# Arguments go to pytest, e.g. `scripts/test.sh tests/unit` for one tier.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/test-services.sh >/dev/null
exec .venv/bin/python -m pytest --durations=30 "${@:-tests}"  # the slowest tests, to keep CI well under its limit
