#!/usr/bin/env bash
# Creates .venv and installs the project with the trainer, operator and test extras.
# Re-running is cheap: pip's cache (~/.cache/pip, outside the clone) keeps the large wheels (torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip wheel
.venv/bin/python -m pip install --quiet -e ".[trainer,operator,test]"
echo "environment ready: $(pwd)/.venv (activate with: source .venv/bin/activate)"
