#!/usr/bin/env bash
# Refreshes uv.lock to the newest versions the registry serves within pyproject.toml's ranges (uv prints
# each "Updated <package> <old> -> <new>"), installs that set into .venv and runs the whole suite against
# it; arguments go to pytest. The new lock stays in the working tree whatever the outcome: commit it when
# the suite passes, or bound the package that broke in pyproject.toml and run this again
# (docs/dependencies.md). `git checkout uv.lock && scripts/setup.sh` returns to the tested set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/uv.sh lock --upgrade
exec scripts/test.sh "$@"
