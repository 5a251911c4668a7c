#!/usr/bin/env bash
# Runs uv, the project's installer and locker, at the version pinned (with hashes) in
# scripts/uv-requirements.txt. Installs it once into a cache outside the clone; needs only python3 and pip.
#   LORA_CACHE_DIR moves the cache (default ~/.cache/lora-operator).
set -euo pipefail
pins="$(cd "$(dirname "$0")" && pwd)/uv-requirements.txt"
version=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$pins")
home="${LORA_CACHE_DIR:-$HOME/.cache/lora-operator}/uv-$version"
if [ ! -x "$home/bin/uv" ]; then
  echo "installing uv $version into $home" >&2
  rm -rf "$home.partial"
  python3 -m venv "$home.partial"
  "$home.partial/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$pins"
  rm -rf "$home" && mv "$home.partial" "$home"   # a venv works moved: uv is one static binary in bin/
fi
exec "$home/bin/uv" "$@"
