#!/usr/bin/env bash
# Creates .venv with exactly the tested dependency set in uv.lock (trainer, operator and test extras) and
# the project installed editable. Re-running is cheap: uv's cache (~/.cache/uv, outside the clone) keeps
# the large wheels (torch), and packages that are not in the lock are removed, so .venv always equals it.
# --locked fails if pyproject.toml changed without the lock being refreshed (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/uv.sh sync --locked --quiet --extra trainer --extra operator --extra test
echo "environment ready: $(pwd)/.venv (activate with: source .venv/bin/activate)"
