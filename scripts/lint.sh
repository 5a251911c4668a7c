#!/usr/bin/env bash
# Lint and format check (ruff, configured in pyproject.toml). The dependency direction (import-linter) is
# checked by the suite: tests/unit/test_architecture.py. `scripts/lint.sh --fix` rewrites what it can.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff check --fix .
  exec .venv/bin/ruff format .
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
