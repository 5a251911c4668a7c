#!/usr/bin/env bash
# Creates .venv and installs the project with the trainer, operator and test extras.
# Re-running is cheap: pip's cache (~/.cache/pip, outside the clone) keeps the large wheels (torch).
# LORA_VENV_CACHE=DIR (CI): .venv becomes a link to DIR/venv-<hash of pyproject.toml and Python>, built once
# and reused by every later clone; only the project itself is reinstalled (editable, pointing at this clone).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if [ -n "${LORA_VENV_CACHE:-}" ]; then
  key=$( (cat pyproject.toml; "$python" -VV) | sha256sum | cut -c1-12)
  shared="$LORA_VENV_CACHE/venv-$key"
  if [ ! -e "$shared/.complete" ]; then  # a venv cannot be moved into place: build where it lives
    rm -rf "$shared" && mkdir -p "$LORA_VENV_CACHE"
    "$python" -m venv "$shared"
  fi
  if [ ! -L .venv ] || [ "$(readlink .venv)" != "$shared" ]; then rm -rf .venv && ln -s "$shared" .venv; fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip wheel
.venv/bin/python -m pip install --quiet -e ".[trainer,operator,test]"
if [ -n "${LORA_VENV_CACHE:-}" ]; then touch "$shared/.complete"; fi
echo "environment ready: $(pwd)/.venv (activate with: source .venv/bin/activate)"
